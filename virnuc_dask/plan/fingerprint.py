"""The fingerprint: what identifies a run's numbers, and what differs between two runs.

A finished shard is reused only by a run with the same fingerprint. It hashes the inputs'
bytes, the model's name and the weights' identity (checkpoint digest, or the seed of random
weights), the torch and fair-esm versions, the engine's version
(:data:`~virnuc_dask.engine.ENGINE_VERSION`) and every setting that changes the stored numbers,
the translation of reads included. :func:`identity` is what it hashes, saved in the work
directory's manifest so that a refused resume can name each setting that differs
(:func:`differences`).
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata

from virnuc_dask.config import EmbedConfig
from virnuc_dask.engine import ENGINE_VERSION
from virnuc_dask.errors import option
from virnuc_dask.inputs import FastaIndex
from virnuc_dask.model.weights import WeightsSource
from virnuc_dask.output.residues import ENCODING as RESIDUE_ENCODING


def fingerprint(index: FastaIndex, weights: WeightsSource, config: EmbedConfig) -> str:
    """Hash of the inputs' bytes, the model and weights, versions and numeric settings."""
    return fingerprint_of(identity(index, weights, config))


def fingerprint_of(settings: dict) -> str:
    """The fingerprint of an :func:`identity`."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def identity(index: FastaIndex, weights: WeightsSource, config: EmbedConfig) -> dict:
    """What the fingerprint hashes: everything that changes the stored numbers.

    Saved in the manifest, so that a resumed run with other settings can say which differ.
    """
    identity = {
        "inputs": index.digest,
        **_numbers(weights, config),
        "invalid_to_x": config.invalid_to_x,
        "duplicate_ids": config.duplicate_ids,
    }
    # Absent at their defaults, so that earlier runs' fingerprints stay as they were; present,
    # a resumed run never mixes pooled-only and per-residue shards, or the two long modes.
    if config.per_residue:
        identity["per_residue"] = config.residue_dtype
        # Shards of an earlier encoding of the residues' chunks are recomputed, not refused.
        identity["residue_encoding"] = RESIDUE_ENCODING
    if config.long != "truncate":
        identity["long"] = config.long
    translation = config.translation()
    if translation is not None:  # absent for proteins, so their fingerprints stay as they were
        identity["translation"] = translation.settings()
    return identity


def cache_settings(weights: WeightsSource, config: EmbedConfig, on_gpu: bool) -> dict:
    """What an embedding cache's entries are keyed by besides the sequence's digest.

    Everything of the fingerprint that changes the numbers of one sequence's pooled row: the
    model and weights, the versions of torch, fair-esm and the engine, the layers, the
    compute and stored precisions, the window and the long-sequence rule, and the kind of
    device (a GPU's bf16 and a CPU's fp32 are other numbers). Not the inputs, the translation
    or the id rules: the digest is of the sequence itself.
    """
    return {
        **_numbers(weights, config),
        "long": config.long,
        "device": "cuda" if on_gpu else "cpu",
    }


def _numbers(weights: WeightsSource, config: EmbedConfig) -> dict:
    """The model, weights, versions and settings that change one sequence's pooled numbers."""
    return {
        "model": config.model,
        "weights": weights.identity(),
        "torch": metadata.version("torch"),
        "fair-esm": metadata.version("fair-esm"),
        "engine": ENGINE_VERSION,
        "layers": config.layer_list(),
        "dtype": config.dtype,
        "output_dtype": config.output_dtype,
        "max_residues": config.max_residues,
    }


#: Values of the identity's optional keys when they are absent (their defaults).
_ABSENT = {"per_residue": "off", "long": "truncate", "translate": "none (proteins)"}


#: Identity keys that are not options, as a message names them.
_NAMES = {
    "inputs": "the inputs' contents",
    "weights": "weights",
    "torch": "torch",
    "fair-esm": "fair-esm",
    "engine": "engine version",
}


def differences(old: dict, new: dict) -> list[str]:
    """The settings that differ between two identities, ``NAME OLD then, NAME NEW now``."""

    def flat(settings: dict) -> dict:
        out = {}
        for key, value in settings.items():
            out.update(value if isinstance(value, dict) else {key: value})
        return out

    def shown(settings: dict, key: str) -> object:
        value = settings.get(key, _ABSENT.get(key))
        return ",".join(map(str, value)) if isinstance(value, list | tuple) else value

    old, new = flat(old), flat(new)
    said = []
    for key in sorted(set(old) | set(new)):
        before, after = shown(old, key), shown(new, key)
        if before == after:
            continue
        if key == "inputs":
            said.append(_NAMES[key] + " differ")
        elif key in _NAMES:
            said.append(f"{_NAMES[key]} {before} then, {after} now")
        else:
            said.append(f"{option(key, before)} then, {option(key, after)} now")
    return said
