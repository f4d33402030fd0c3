"""virnuc_dask: ESM-2 protein embeddings for millions of sequences, on every GPU, through Dask.

The data flow, one module each: :mod:`~virnuc_dask.index` (scan FASTA into numpy arrays),
:mod:`~virnuc_dask.partition` (length-sort, stride over workers, cut into chunks),
:mod:`~virnuc_dask.cluster` (local GPU/CPU cluster or an existing scheduler),
:mod:`~virnuc_dask.worker` (resident model per worker, one task per chunk),
:mod:`~virnuc_dask.engine` (tokens to pooled vectors on a device),
:mod:`~virnuc_dask.output` (shards, the final HDF5/Zarr file),
:mod:`~virnuc_dask.workdir` (locks, saved partition, what a resumed run reuses), and
:mod:`~virnuc_dask.pipeline` (the Dask graph that ties them), with :mod:`~virnuc_dask.cli` on top.
"""

__version__ = "0.1.0"

from virnuc_dask.config import EmbedConfig
from virnuc_dask.errors import VirnucError
from virnuc_dask.output import open_embeddings
from virnuc_dask.pipeline import EmbeddingJob, embed, prepare

__all__ = [
    "EmbedConfig",
    "EmbeddingJob",
    "VirnucError",
    "embed",
    "open_embeddings",
    "prepare",
    "__version__",
]
