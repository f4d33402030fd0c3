"""virnuc_dask: ESM-2 protein embeddings for millions of sequences, on every GPU, through Dask.

The data flow, one module each: :mod:`~virnuc_dask.inputs` (the input side, a package: scan
FASTA into numpy arrays, or translate nucleotide reads into peptides),
:mod:`~virnuc_dask.partition` (length-sort, stride over workers, cut into chunks),
:mod:`~virnuc_dask.hardware` (the local cluster's shape) and
:mod:`~virnuc_dask.cluster` (local GPU/CPU cluster or an existing scheduler),
:mod:`~virnuc_dask.worker` (resident model per worker, one task per chunk),
:mod:`~virnuc_dask.engine` (tokens to pooled vectors on a device), with
:mod:`~virnuc_dask.windows` (long sequences in overlapping windows),
:mod:`~virnuc_dask.output` (shards, the final HDF5/Zarr file),
:mod:`~virnuc_dask.workdir` (saved partition, what a resumed run reuses), with
:mod:`~virnuc_dask.paths` (the run's paths checked before any work),
:mod:`~virnuc_dask.lock` (one run per output) and :mod:`~virnuc_dask.ownership` (the tool
removes only what it made), and :mod:`~virnuc_dask.pipeline` (the Dask graph that ties them,
:mod:`~virnuc_dask.progress` while it runs), with :mod:`~virnuc_dask.cli` on top.

The public names are imported on first use, so that ``virnuc-dask --help`` and the command
line's usage errors answer without importing torch, Dask's distributed scheduler or xarray.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "EmbedConfig": "virnuc_dask.config",
    "EmbeddingJob": "virnuc_dask.pipeline",
    "RunReport": "virnuc_dask.pipeline",
    "VirnucError": "virnuc_dask.errors",
    "embed": "virnuc_dask.pipeline",
    "open_embeddings": "virnuc_dask.output",
    "prepare": "virnuc_dask.pipeline",
    "residues_of": "virnuc_dask.output",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'virnuc_dask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
