"""Output: the package that owns files on disk: shards, the final HDF5 file, and Zarr.

The data flow, one module per idea:

- :mod:`.shards`: each chunk's result, written atomically by its worker;
- :mod:`.writer`: :class:`OutputWriter` builds the final file while the chunks finish, in
  the :mod:`.layout` that xarray reads;
- :mod:`.assembly`: the one assembly of a run's shards (:func:`assemble` in one call);
- :mod:`.residues`: per-residue values, laid out by chunk and streamed shard by shard;
- :mod:`.zarr_store`: the same content as a Zarr store;
- :mod:`.targets`: what may be written where, and the renames that make outputs appear whole;
- :mod:`.publish`: outputs at URLs, built locally as stand-ins and put there once complete;
- :mod:`.space`: a full disk becomes :class:`DiskFull`, the shards kept;
- :mod:`.reading`: :func:`open_embeddings` opens an output as an ``xarray.Dataset``;
- :mod:`.backend`: the same reading as xarray's engine ``virnuc``
  (``xarray.open_dataset(path, engine="virnuc")``).

The names are imported on first use (as in the top-level ``virnuc_dask``), so that
importing one module of the package, the xarray engine of :mod:`.backend` above all, does not
import h5py, hdf5plugin and the writer: xarray imports every installed engine's module
whenever it lists the engines, for any file it opens without ``engine=``.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "OUTPUT": "virnuc_dask.output.targets",
    "POOLING": "virnuc_dask.output.layout",
    "RESIDUES_PER_CHUNK": "virnuc_dask.output.residues",
    "ROWS_PER_CHUNK": "virnuc_dask.output.zarr_store",
    "ZARR_STORE": "virnuc_dask.output.targets",
    "DiskFull": "virnuc_dask.output.space",
    "OutputWriter": "virnuc_dask.output.writer",
    "ResidueLayout": "virnuc_dask.output.residues",
    "ShardInfo": "virnuc_dask.output.shards",
    "ShardMismatch": "virnuc_dask.output.shards",
    "assemble": "virnuc_dask.output.assembly",
    "check_target": "virnuc_dask.output.targets",
    "open_embeddings": "virnuc_dask.output.reading",
    "remove_stale_partials": "virnuc_dask.output.targets",
    "residues_of": "virnuc_dask.output.residues",
    "shard_matches": "virnuc_dask.output.shards",
    "write_shard": "virnuc_dask.output.shards",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'virnuc_dask.output' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
