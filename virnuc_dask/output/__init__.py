"""Output: the package that owns files on disk: shards, the final HDF5 file, and Zarr.

The data flow, one module per idea:

- :mod:`.shards`: each chunk's result, written atomically by its worker;
- :mod:`.writer`: :class:`OutputWriter` builds the final file while the chunks finish, in
  the :mod:`.layout` that xarray reads, and :func:`assemble` does it in one call;
- :mod:`.residues`: per-residue values, laid out by chunk and streamed shard by shard;
- :mod:`.zarr_store`: the same content as a Zarr store;
- :mod:`.targets`: what may be written where, and the renames that make outputs appear whole;
- :mod:`.publish`: outputs at URLs, built locally as stand-ins and put there once complete;
- :mod:`.space`: a full disk becomes :class:`DiskFull`, the shards kept;
- :mod:`.reading`: :func:`open_embeddings` opens an output as an ``xarray.Dataset``.
"""

from virnuc_dask.output.layout import POOLING
from virnuc_dask.output.reading import open_embeddings
from virnuc_dask.output.residues import RESIDUES_PER_CHUNK, ResidueLayout, residues_of
from virnuc_dask.output.shards import ShardInfo, ShardMismatch, shard_matches, write_shard
from virnuc_dask.output.space import DiskFull
from virnuc_dask.output.targets import OUTPUT, ZARR_STORE, check_target, remove_stale_partials
from virnuc_dask.output.writer import OutputWriter, assemble
from virnuc_dask.output.zarr_store import ROWS_PER_CHUNK

__all__ = [
    "OUTPUT",
    "POOLING",
    "RESIDUES_PER_CHUNK",
    "ROWS_PER_CHUNK",
    "ZARR_STORE",
    "DiskFull",
    "OutputWriter",
    "ResidueLayout",
    "ShardInfo",
    "ShardMismatch",
    "assemble",
    "check_target",
    "open_embeddings",
    "remove_stale_partials",
    "residues_of",
    "shard_matches",
    "write_shard",
]
