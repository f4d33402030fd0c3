"""The final file's layout: netCDF-4 written as xarray writes it, values at a fixed offset.

Layout (``docs/output.md``):

- ``embedding`` (``sequence``, ``feature``) or (``sequence``, ``layer``, ``feature``), float32
  or float16, contiguous;
- ``sequence``: the ids, variable-length UTF-8, a dimension scale (``ds.sel(sequence=ID)``);
- ``length`` (residues before truncation), ``truncated`` (bool), with ``long="window"``
  ``windows`` (windows per sequence);
- with ``per_residue``: ``residue_start`` along ``sequence`` and ``residue_embedding``
  (``residue``, [``layer``,] ``feature``), chunked and compressed (:mod:`.residues`);
- for a run on reads, the peptides' provenance as coordinates along ``sequence`` (``read``,
  ``frame``, ``strand``, ``nt_start``, ``nt_end``, ...), given by the caller;
- attributes: model, layers, pooling, compute dtype, weights source, versions, inputs, time.

Decisions:

- The ``embedding`` variable alone is created contiguous, allocated at once and never filled,
  so that its bytes have one fixed offset in the file, which is memory-mapped and written with
  each shard's rows: no staging array, no second copy. Contiguous rather than chunked by rows:
  a chunked variable's chunks have no place in the file until HDF5 writes them.
- Those bytes are reserved (``posix_fallocate``) before they are mapped: a write to a mapped
  page that the disk has no room for is a SIGBUS that kills the process, while the reservation
  fails with ENOSPC, which becomes :class:`~virnuc_dask.output.space.DiskFull`. So a full disk
  stops the run when it starts, not after the compute.
- Ids are variable-length strings on disk and object arrays in memory: a fixed-width numpy
  string array is as wide as the longest id, so one 1 MB id made 301 ids take 1.2 GB.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import h5py
import numpy as np

from virnuc_dask.output.residues import ResidueLayout, create_variable
from virnuc_dask.output.space import close_half_closed

logger = logging.getLogger(__name__)

#: How the vectors are pooled, recorded in every output file.
POOLING = "mean over residues, BOS/EOS excluded"


def create_layout(
    path: Path,
    *,
    ids: list[str],
    lengths: np.ndarray,
    max_residues: int,
    layers: list[int],
    width: int,
    dtype: np.dtype,
    attrs: dict,
    variables: dict[str, np.ndarray] | None = None,
    truncated: np.ndarray | None = None,
    windows: np.ndarray | None = None,
    residues: ResidueLayout | None = None,
) -> int | None:
    """Write the file's netCDF-4 layout, all but the embedding values; return their offset.

    Written through h5netcdf, as xarray writes it (the ids a variable-length UTF-8 dimension
    scale, ``truncated`` as int8 marked ``dtype="bool"``, a NaN ``_FillValue`` on the values),
    so that xarray opens it without warnings. Returns None when the values take no bytes.

    ``truncated`` (default: longer than ``max_residues``) and ``windows`` (windows per
    sequence, stored when given) describe how long sequences were embedded; ``residues`` adds
    ``residue_start`` and the chunked, compressed ``residue_embedding`` (never filled: each
    shard's chunks are copied in as they arrive, see :mod:`.residues`).
    """
    import h5netcdf

    single = len(layers) == 1
    dimensions = {"sequence": len(ids)}
    if not single:
        dimensions["layer"] = len(layers)
    dimensions["feature"] = width
    if residues is not None:
        dimensions["residue"] = residues.rows
    # Contiguous and allocated now: the values get one fixed place in the file, which the
    # shards are copied into through a memory map. Never filled: HDF5 would otherwise write
    # the whole variable with NaN first, and close() refuses a file with rows left unwritten.
    create = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    create.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    try:
        with h5netcdf.File(path, "w") as f:
            f.dimensions = dimensions
            f.create_variable(
                "sequence",
                ("sequence",),
                dtype=h5py.string_dtype(),
                data=np.array(ids, dtype=object),
            )
            if not single:
                f.create_variable("layer", ("layer",), data=np.array(layers, dtype=np.int32))
            f.create_variable("length", ("sequence",), data=lengths.astype(np.int64))
            if truncated is None:
                truncated = lengths > max_residues
            flags = f.create_variable(
                "truncated", ("sequence",), data=np.asarray(truncated).astype(np.int8)
            )
            flags.attrs["dtype"] = "bool"
            if windows is not None:
                f.create_variable("windows", ("sequence",), data=windows.astype(np.int32))
            if residues is not None:
                f.create_variable("residue_start", ("sequence",), data=residues.start)
                names = tuple(d for d in dimensions if d in ("layer", "feature"))
                sizes = tuple(dimensions[d] for d in names)
                create_variable(f, ("residue", *names), sizes, residues.dtype)
            for name, values in (variables or {}).items():
                _create_sequence_variable(f, name, values)
            values = f.create_variable(
                "embedding",
                tuple(d for d in dimensions if d != "residue"),
                dtype=dtype,
                fillvalue=np.array(np.nan, dtype=dtype),
                chunks=None,
                dcpl=create,
                fill_time="never",
            )
            if variables:
                # Coordinates of the embedding (CF), as xarray writes non-index coordinates:
                # then `ds.embedding.groupby("read")` works, not only `ds.groupby("read")`.
                values.attrs["coordinates"] = " ".join(variables)
            f.attrs.update(attrs)
    except BaseException as error:
        close_half_closed(error, path)
        raise
    with h5py.File(path, "r") as f:
        values = f["embedding"]
        if values.size == 0:
            return None  # h5netcdf chunks an empty variable; there is nothing to map anyway
        if values.chunks is not None or values.dtype != dtype:
            raise RuntimeError(f"{path}: embedding is not a contiguous {dtype} variable")
        return values.id.get_offset()


def _create_sequence_variable(f, name: str, values: np.ndarray) -> None:
    """One more variable along ``sequence``, written as xarray writes its kind of values."""
    values = np.asarray(values)
    if values.dtype == object:
        f.create_variable(name, ("sequence",), dtype=h5py.string_dtype(), data=values)
    elif values.dtype.kind == "S":
        # Fixed-width text (frame names, strands): xarray decodes it to str by this attribute.
        variable = f.create_variable(name, ("sequence",), data=values)
        variable.attrs["_Encoding"] = "utf-8"
    else:
        f.create_variable(name, ("sequence",), data=values)


def variable_bytes(values: np.ndarray) -> int:
    """About the bytes a variable along ``sequence`` takes in the file."""
    values = np.asarray(values)
    if values.dtype == object:
        return sum(len(v) for v in values) + 16 * len(values)
    return values.nbytes


def map_reserved(
    path: Path, offset: int | None, shape: tuple[int, ...], dtype: np.dtype
) -> np.memmap | None:
    """Reserve the embedding's bytes of the file at ``path`` and memory-map them for writing."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes == 0:
        return None
    # Reserve the blocks first, so that a full disk is ENOSPC here and not a SIGBUS later (a
    # write to a mapped page that the disk has no room for kills the process).
    with open(path, "r+b") as f:
        try:
            if not hasattr(os, "posix_fallocate"):  # macOS: no reservation call
                raise OSError(errno.ENOSYS, "posix_fallocate is not available")
            os.posix_fallocate(f.fileno(), offset, nbytes)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logger.warning("cannot reserve space for %s (%s): writing it unreserved", path, error)
    return np.memmap(path, dtype=dtype, mode="r+", offset=offset, shape=shape)


def add_attributes(path: Path, attrs: dict) -> None:
    """Set attributes of the finished file at ``path``, as xarray would have written them."""
    import h5netcdf

    try:
        with h5netcdf.File(path, "r+") as f:
            f.attrs.update(attrs)
    except BaseException as error:
        close_half_closed(error, path)
        raise
