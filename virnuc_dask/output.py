"""Output: the one module that owns files on disk: shards, the final HDF5, and Zarr.

A *shard* is one chunk's result, an HDF5 file written to a temporary name and renamed, so a
retried or resumed task never leaves half a shard. It holds the input rows it covers, their ids
(as read by the worker, so that assembly can prove the alignment), the pooled embeddings, and
the run's fingerprint.

The *final file* is assembled in one pass by one writer (h5py objects cannot cross processes):
shards are scattered into a staged memory-mapped array in input order, every row is checked to
be present exactly once with the id the index expects, and xarray writes the netCDF-4/HDF5 file
through h5netcdf to a temporary name, renamed when complete. Layout (``docs/output.md``):

- ``embedding`` (``sequence``, ``feature``) or (``sequence``, ``layer``, ``feature``), float32
  or float16, chunked by rows;
- ``sequence``: the ids, variable-length UTF-8, a dimension scale (``ds.sel(sequence=ID)``);
- ``length`` (residues before truncation), ``truncated`` (bool);
- attributes: model, layers, pooling, compute dtype, weights source, versions, inputs, time.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from virnuc_dask.errors import VirnucError

#: How the vectors are pooled, recorded in every output file.
POOLING = "mean over residues, BOS/EOS excluded"
#: Rows per HDF5/Zarr chunk of the final file.
ROWS_PER_CHUNK = 4096


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
    dtype: str = "float32",
) -> None:
    """Write one chunk's result atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with h5py.File(partial, "w") as f:
            f.attrs["fingerprint"] = fingerprint
            f.create_dataset("rows", data=np.asarray(rows, dtype=np.int64))
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("embedding", data=embedding.astype(dtype, copy=False))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def shard_matches(path: str | Path, fingerprint: str, rows: np.ndarray) -> bool:
    """Whether a shard on disk is complete and belongs to this run and these rows."""
    try:
        with h5py.File(path, "r") as f:
            return (
                f.attrs.get("fingerprint") == fingerprint
                and f["embedding"].shape[0] == len(rows)
                and np.array_equal(f["rows"][:], rows)
            )
    except (OSError, KeyError):
        return False


def assemble(
    shards: list[ShardInfo],
    *,
    ids: list[str],
    lengths: np.ndarray,
    max_residues: int,
    layers: list[int],
    output: str | Path,
    staging: str | Path,
    attrs: dict,
    dtype: str = "float32",
    zarr_path: str | Path | None = None,
) -> str:
    """Assemble shards into the final file in input order, validate it, and rename it in place.

    Parameters
    ----------
    shards
        Every chunk's :class:`ShardInfo`.
    ids, lengths
        Ids and residue counts of all sequences, in input order.
    max_residues
        Truncation window, for the ``truncated`` flag.
    layers
        The pooled layers (the ``layer`` coordinate when there are several).
    output
        Final HDF5 path; written as a temporary name in the same folder, then renamed.
    staging
        Folder for the memory-mapped staging array.
    attrs
        Attributes of the file.
    dtype
        Stored precision.
    zarr_path
        Also write the same content as a Zarr v3 store here.

    Returns
    -------
    str
        The output path.
    """
    staged, seen = _scatter(shards, ids, Path(staging), dtype)
    missing = np.flatnonzero(seen == 0)
    doubled = np.flatnonzero(seen > 1)
    if len(missing) or len(doubled):
        raise RuntimeError(
            f"assembly found {len(missing)} sequences missing and {len(doubled)} embedded more "
            f"than once (first missing: {[ids[i] for i in missing[:3]]}, first doubled: "
            f"{[ids[i] for i in doubled[:3]]})"
        )
    dataset = _dataset(staged, ids, np.asarray(lengths), max_residues, layers, attrs)
    output = Path(output)
    _write_atomically(output, lambda tmp: _to_netcdf(dataset, tmp))
    if zarr_path is not None:
        _write_atomically(Path(zarr_path), lambda tmp: _to_zarr(dataset, tmp))
    return str(output)


def _scatter(
    shards: list[ShardInfo], ids: list[str], staging: Path, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """Copy every shard's rows into a staged array in input order; count each row's copies."""
    seen = np.zeros(len(ids), dtype=np.int32)
    staged = None
    staging.mkdir(parents=True, exist_ok=True)
    for shard in sorted(shards, key=lambda s: s.chunk):
        with h5py.File(shard.path, "r") as f:
            rows = f["rows"][:]
            shard_ids = f["ids"].asstr()[:]
            embedding = f["embedding"][:]
        expected = [ids[r] for r in rows]
        if list(shard_ids) != expected:
            bad = next(
                i for i, (a, b) in enumerate(zip(shard_ids, expected, strict=True)) if a != b
            )
            raise RuntimeError(
                f"shard {shard.path} is misaligned: row {rows[bad]} holds {shard_ids[bad]!r}, "
                f"the index says {expected[bad]!r}"
            )
        if staged is None:
            staged = np.lib.format.open_memmap(
                staging / "embedding.npy",
                mode="w+",
                dtype=dtype,
                shape=(len(ids),) + embedding.shape[1:],
            )
        staged[rows] = embedding
        seen[rows] += 1
    if staged is None:
        raise RuntimeError("no shards to assemble")
    staged.flush()
    return staged, seen


def _dataset(staged, ids, lengths, max_residues, layers, attrs):
    import dask.array as da
    import xarray as xr

    single = len(layers) == 1
    values = da.from_array(staged, chunks=(ROWS_PER_CHUNK,) + staged.shape[1:])
    if single:
        values = values[:, 0, :]
    dims = ("sequence", "feature") if single else ("sequence", "layer", "feature")
    coords = {"sequence": np.array(ids, dtype=object)}
    if not single:
        coords["layer"] = np.array(layers, dtype=np.int32)
    return xr.Dataset(
        {
            "embedding": (dims, values),
            "length": ("sequence", lengths.astype(np.int64)),
            "truncated": ("sequence", lengths > max_residues),
        },
        coords=coords,
        attrs=attrs,
    )


def _to_netcdf(dataset, path: Path) -> None:
    import dask

    chunks = (ROWS_PER_CHUNK,) + dataset["embedding"].shape[1:]
    chunks = tuple(min(c, s) for c, s in zip(chunks, dataset["embedding"].shape, strict=True))
    encoding = {"embedding": {"chunksizes": chunks}}
    # This runs inside a Dask task: write with the local synchronous scheduler, not the
    # cluster, so the staged array is streamed to the file block by block.
    with dask.config.set(scheduler="synchronous"):
        dataset.to_netcdf(path, engine="h5netcdf", encoding=encoding)


def _to_zarr(dataset, path: Path) -> None:
    import dask

    rows = min(ROWS_PER_CHUNK, dataset.sizes["sequence"])
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        # Variable-length strings are not yet in the Zarr v3 core specification; zarr-python
        # warns about it on every write. xarray reads them back fine.
        warnings.filterwarnings("ignore", message=".*not part of the Zarr format 3")
        dataset.chunk({"sequence": rows}).to_zarr(
            path, zarr_format=3, mode="w-", consolidated=False
        )


def _write_atomically(target: Path, write) -> None:
    """Write to a temporary sibling of ``target``, then rename it over ``target``."""
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    try:
        write(partial)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(partial, target)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial)
        else:
            partial.unlink(missing_ok=True)


def open_embeddings(path: str | Path):
    """Open an embedding file (HDF5 or Zarr) as an ``xarray.Dataset``.

    Parameters
    ----------
    path
        An HDF5 file written by :func:`virnuc_dask.embed`, or its ``--zarr`` store.

    Returns
    -------
    xarray.Dataset
        With ``embedding``, ``length`` and ``truncated`` indexed by ``sequence`` (the ids),
        lazily loaded.
    """
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise VirnucError(f"no embedding file at {path}")
    if path.is_dir():
        return xr.open_zarr(path, consolidated=False)
    return xr.open_dataset(path, engine="h5netcdf")
