"""A shared cache of pooled embeddings, keyed by the digest of each sequence.

No Dask and no torch here: numpy, h5py and the storage places. :mod:`~virnuc_dask.cache.store`
(the cache, its namespaces, lookups and additions, and the layout's decisions), with
:mod:`~virnuc_dask.cache.entries` (an entry: the committed record of a segment),
:mod:`~virnuc_dask.cache.segments` (a segment's HDF5 file, written and checked) and
:mod:`~virnuc_dask.cache.index` (the vectorised lookup); :mod:`~virnuc_dask.cache.maintenance`
(info, verify, prune).
"""

from virnuc_dask.cache.entries import Entry
from virnuc_dask.cache.maintenance import (
    CacheInfo,
    NamespaceInfo,
    Problem,
    PruneReport,
    Removal,
    info,
    prune,
    verify,
)
from virnuc_dask.cache.store import CacheError, EmbeddingCache, Hits, Namespace, namespace_name

__all__ = [
    "CacheError",
    "CacheInfo",
    "EmbeddingCache",
    "Entry",
    "Hits",
    "Namespace",
    "NamespaceInfo",
    "Problem",
    "PruneReport",
    "Removal",
    "info",
    "namespace_name",
    "prune",
    "verify",
]
