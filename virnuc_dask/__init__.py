"""virnuc_dask: ESM-2 protein embeddings for millions of sequences, on every GPU, through Dask.

The packages follow the data flow (``docs/architecture.md``): :mod:`~virnuc_dask.inputs`
(FASTA scanned into numpy arrays, or nucleotide reads translated into peptides),
:mod:`~virnuc_dask.plan` (windows, length-sorted chunks dealt over workers, the fingerprint),
:mod:`~virnuc_dask.cluster` (a local GPU/CPU cluster or an existing scheduler, the model
resident on each worker, one task per chunk), :mod:`~virnuc_dask.engine` (tokens to vectors
on a device) with :mod:`~virnuc_dask.model` (which models, their weights, loading),
:mod:`~virnuc_dask.output` (shards, the final HDF5/Zarr file) and :mod:`~virnuc_dask.storage`
(local paths and URLs, locks, ownership); :mod:`~virnuc_dask.run` ties them (prepare, the
graph, its execution, progress), with :mod:`~virnuc_dask.cli` on top.

The public names are imported on first use, so that ``virnuc-dask --help`` and the command
line's usage errors answer without importing torch, Dask's distributed scheduler or xarray.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: The public names, and the module that defines each (imported on first use).
_PUBLIC = {
    "EmbedConfig": "virnuc_dask.config",
    "EmbeddingJob": "virnuc_dask.run.job",
    "RunReport": "virnuc_dask.run.report",
    "VirnucError": "virnuc_dask.errors",
    "embed": "virnuc_dask.run.embed",
    "open_embeddings": "virnuc_dask.output",
    "prepare": "virnuc_dask.run.prepare",
    "residues_of": "virnuc_dask.output",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'virnuc_dask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
