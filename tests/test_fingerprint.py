"""The fingerprint: every setting, version and weight that changes the numbers changes it."""

from __future__ import annotations

import dataclasses

import pytest

from tests.helpers import TINY, random_sequences, write_fasta
from virnuc_dask.config import EmbedConfig
from virnuc_dask.inputs import build_index
from virnuc_dask.model.checkpoint import resolve_weights
from virnuc_dask.plan import fingerprint


@pytest.fixture
def index(tmp_path):
    fasta = tmp_path / "in.fasta"
    write_fasta(fasta, random_sequences(5, 10, 20))
    return build_index([fasta])


def _fingerprint(index, model=TINY, seed=0, **settings):
    config = EmbedConfig.from_settings(model=model, random_weights=True, seed=seed, **settings)
    weights = resolve_weights(model, random_weights=True, seed=seed)
    return fingerprint.fingerprint(index, weights, dataclasses.replace(config, dtype="fp32"))


def test_the_fingerprint_covers_the_model_name_weights_and_settings(index):
    base = _fingerprint(index)
    assert _fingerprint(index) == base
    others = [
        _fingerprint(index, model="esm2_t6_8M_UR50D"),
        _fingerprint(index, seed=1),
        _fingerprint(index, layers=[1]),
        _fingerprint(index, max_residues=100),
        _fingerprint(index, output_dtype="float16"),
    ]
    assert len({base, *others}) == 6


def test_the_fingerprint_covers_versions_and_the_engine(index, monkeypatch):
    base = _fingerprint(index)
    monkeypatch.setattr(fingerprint, "ENGINE_VERSION", 999)
    assert _fingerprint(index) != base
    monkeypatch.undo()
    real = fingerprint.metadata.version
    monkeypatch.setattr(
        fingerprint.metadata, "version", lambda name: "0.0" if name == "torch" else real(name)
    )
    assert _fingerprint(index) != base
