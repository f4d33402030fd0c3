"""Shards: one chunk's result, written atomically by the worker that computed it.

A shard is an HDF5 file written to a temporary name and renamed, so a retried or resumed task
never leaves half a shard. It holds the input rows it covers, their ids (as read by the
worker, so that assembly can prove the alignment), the pooled embeddings, and what they are:
the run's fingerprint, the pooled layers and the width. With per-residue output it also holds
the chunk's residues, written while the chunk computes (:mod:`.residues`), and their counts.

A shard of another run (fingerprint), another layer set, width or dtype is refused
(:class:`ShardMismatch`), never cast or broadcast into the output: a width-1 shard would
otherwise fill every feature of its rows with one number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from virnuc_dask.errors import VirnucError
from virnuc_dask.output.targets import partial_name


def shard_path(shard_dir: str, chunk) -> str:
    """The shard file of ``chunk`` (a :class:`~virnuc_dask.plan.partition.Chunk`) in a folder."""
    return os.path.join(shard_dir, f"shard-{chunk.number:06d}.h5")


class ShardMismatch(VirnucError):
    """A shard does not belong to the run being assembled.

    Its fingerprint, layers, width or dtype differ from the run's. Nothing is written and the
    run's shards are kept; a resumed run recomputes the shards that do not match.
    """


@dataclass(frozen=True)
class ShardInfo:
    """What a finished chunk task returns: where its shard is and what it holds."""

    chunk: int
    path: str
    sequences: int
    tokens: int
    worker: str
    seconds: float


def write_shard(
    path: str | Path,
    *,
    rows: np.ndarray,
    ids: list[str],
    embedding: np.ndarray,
    fingerprint: str,
    layers: list[int] | None = None,
    dtype: str = "float32",
    partial: str | Path | None = None,
) -> None:
    """Write one chunk's result atomically: a temporary file in the same folder, then a rename.

    Parameters
    ----------
    path
        The shard's final path.
    rows
        The input rows the shard covers, in the order of ``ids`` and ``embedding``.
    ids
        The ids of those rows as the worker read them.
    embedding
        Pooled vectors, shape ``(len(rows), len(layers), width)``.
    fingerprint
        The run's fingerprint.
    layers
        The pooled layers, recorded so that assembly and resume can refuse other layer sets;
        not recorded when None.
    dtype
        Stored precision.
    partial
        The partial shard already holding the chunk's per-residue rows
        (:class:`~virnuc_dask.output.residues.ShardResidues`, closed): completed and renamed.
        None: a fresh partial file.
    """
    path = Path(path)
    embedding = np.asarray(embedding)
    if embedding.ndim != 3 or (layers is not None and embedding.shape[1] != len(layers)):
        raise ValueError(
            f"embedding of shape {embedding.shape} is not (rows, {len(layers or ()) or 'layers'}"
            ", width)"
        )
    partial = partial_name(path) if partial is None else Path(partial)
    try:
        with h5py.File(partial, "r+" if partial.exists() else "w") as f:
            f.attrs["fingerprint"] = fingerprint
            f.attrs["width"] = embedding.shape[2]
            if layers is not None:
                f.attrs["layers"] = np.asarray(layers, dtype=np.int64)
            f.create_dataset("rows", data=np.asarray(rows, dtype=np.int64))
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("embedding", data=embedding.astype(dtype, copy=False))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def shard_matches(
    path: str | Path,
    fingerprint: str,
    rows: np.ndarray,
    *,
    layers: list[int] | None = None,
    width: int | None = None,
    dtype: str | None = None,
) -> bool:
    """Whether a shard on disk is complete and belongs to this run and these rows.

    Parameters
    ----------
    path
        The shard.
    fingerprint
        The run's fingerprint.
    rows
        The rows the chunk covers, in order.
    layers, width, dtype
        When given, the shard must also hold these layers (count, and numbers if it recorded
        them), this width and this dtype.
    """
    try:
        with h5py.File(path, "r") as f:
            return (
                mismatch(f, fingerprint=fingerprint, layers=layers, width=width, dtype=dtype)
                is None
                and f["embedding"].shape[0] == len(rows)
                and np.array_equal(f["rows"][:], rows)
            )
    except (OSError, KeyError):
        return False


def mismatch(f: h5py.File, *, fingerprint, layers, width, dtype) -> str | None:
    """What makes an open shard foreign to the run, in words; None when nothing does."""
    stored = f["embedding"]
    if fingerprint is not None and f.attrs.get("fingerprint") != fingerprint:
        return (
            f"fingerprint is {f.attrs.get('fingerprint')!r}, the run's {fingerprint!r} (another "
            "run's inputs or settings)"
        )
    if layers is not None:
        if stored.ndim != 3 or stored.shape[1] != len(layers):
            held = stored.shape[1] if stored.ndim == 3 else "no"
            return f"layers differ: it holds {held} per row, the run pools {list(layers)}"
        recorded = f.attrs.get("layers")
        if recorded is not None and np.atleast_1d(recorded).tolist() != list(layers):
            return f"layers are {np.atleast_1d(recorded).tolist()}, the run's {list(layers)}"
    if width is not None and stored.shape[-1] != width:
        return f"embedding width is {stored.shape[-1]}, the run's {width}"
    if dtype is not None and stored.dtype != np.dtype(dtype):
        return f"dtype is {stored.dtype}, the run's {np.dtype(dtype)}"
    return None
