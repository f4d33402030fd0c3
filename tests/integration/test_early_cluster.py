"""A large input is indexed while the local cluster starts (``embed()``'s early start).

The threshold is lowered to 0 bytes so that small files take that path: a run gives the same
file as the ordinary path, and a malformed record found while the cluster starts still fails
with its line, closes the cluster and leaves nothing behind.
"""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

import virnuc_dask
from tests.helpers import TINY, random_sequences, write_fasta
from virnuc_dask.cluster.local import EarlyCluster
from virnuc_dask.errors import VirnucError
from virnuc_dask.run import embed as embedding


def run(fasta, output, **settings):
    return virnuc_dask.embed(
        fasta, output, model=TINY, random_weights=True, workers=2, progress=False, **settings
    )


def test_the_early_start_gives_the_same_file_as_indexing_first(tmp_path, monkeypatch):
    fasta = tmp_path / "in.fasta"
    write_fasta(fasta, random_sequences(40, 20, 200, seed=5))
    late = run(fasta, tmp_path / "late.h5")
    started = []
    original = EarlyCluster.start

    def start(self, engine, local):
        started.append((local / "index").exists())  # whether the index was saved already
        return original(self, engine, local)

    monkeypatch.setattr(embedding, "EARLY_START_BYTES", 0)
    monkeypatch.setattr(EarlyCluster, "start", start)
    early = run(fasta, tmp_path / "early.h5")
    assert started == [False], "the cluster was not started before the index was saved"
    late_ds, early_ds = virnuc_dask.open_embeddings(late), virnuc_dask.open_embeddings(early)
    assert list(early_ds.sequence.values) == list(late_ds.sequence.values)
    np.testing.assert_array_equal(early_ds.embedding.values, late_ds.embedding.values)
    assert "cluster_start" in early_ds.attrs["phases"]
    with pytest.raises(AssertionError):  # the comparison sees one changed row
        np.testing.assert_array_equal(early_ds.embedding.values[::-1], late_ds.embedding.values)


def test_a_malformed_record_found_while_the_cluster_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(embedding, "EARLY_START_BYTES", 0)
    fasta = tmp_path / "bad.fasta"
    fasta.write_text(">a\nMKV\n>b\nMK1V\n")
    output = tmp_path / "out.h5"
    with pytest.raises(VirnucError, match="bad.fasta"):
        run(fasta, output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fasta"]
    assert multiprocessing.active_children() == []
