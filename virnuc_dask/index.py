"""The FASTA index, under its former module name: see :mod:`virnuc_dask.inputs`.

The input side lives in the :mod:`virnuc_dask.inputs` package (FASTA scan, staging,
duplicates, reads and their translation). This module keeps the names that callers import
from ``virnuc_dask.index``.
"""

from __future__ import annotations

from virnuc_dask.inputs.duplicates import DUPLICATE_POLICIES
from virnuc_dask.inputs.duplicates import check_duplicates as _check_duplicates
from virnuc_dask.inputs.fasta import MAX_ID_BYTES, FastaIndex, _Scan, build_index, read_sequences

__all__ = [
    "DUPLICATE_POLICIES",
    "MAX_ID_BYTES",
    "FastaIndex",
    "_Scan",
    "_check_duplicates",
    "build_index",
    "read_sequences",
]
