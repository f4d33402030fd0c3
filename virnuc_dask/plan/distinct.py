"""Distinct sequences: each sequence is embedded once, however often the inputs repeat it.

:func:`sources` maps every input row to the row whose embedding it gets: its *source*, the
first row with the same digest (itself, for a row seen first). Only sources are partitioned
and embedded; the output fills every other row from its source's values (and, per residue,
points ``residue_start`` at the source's rows: no byte stored twice).

Decisions:

- **The digest is BLAKE2b-128 of the letters the model sees** (upper case, without whitespace
  and the final ``*``, invalid letters as ``X`` when so read:
  :func:`~virnuc_dask.inputs.fasta.sequence_digest`), taken in the index scan. Two sequences
  that differ only in case or line breaks give the same tokens, so one embedding. 128 bits make
  a collision between distinct sequences of a run (or of a cache's billions) negligible (about
  ``n^2 / 2^129``: 10^-25 for 10 M sequences), so equal digests are taken as equal sequences
  without comparing letters; 16 bytes a sequence is 160 MB for 10 M sequences. BLAKE2b is in
  Python's standard library, faster than SHA-256 without SHA instructions, and its 16-byte
  form is a native output size, not a truncation.
- **The first occurrence is the source**, so ids, order, lengths and the reads' provenance stay
  per input row, and a run without duplicates has ``sources[i] == i``.
- The grouping sorts the digests as pairs of 64-bit words (``np.lexsort``: stable, so the
  first row of each group is its smallest); no Python object per sequence.
"""

from __future__ import annotations

import numpy as np


def sources(digests: np.ndarray) -> np.ndarray:
    """The row whose embedding each row gets: the first row with the same digest.

    Parameters
    ----------
    digests
        One 16-byte digest per row, uint8 of shape ``(n, 16)``.

    Returns
    -------
    numpy.ndarray
        int64 of length ``n``; ``sources[i] == i`` for the first row of each distinct
        sequence.
    """
    digests = np.ascontiguousarray(digests, dtype=np.uint8)
    count = len(digests)
    if count == 0:
        return np.empty(0, dtype=np.int64)
    words = digests.view("<u8")  # (n, 2)
    order = np.lexsort((words[:, 1], words[:, 0]))
    ordered = words[order]
    starts = np.ones(count, dtype=bool)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    group = np.cumsum(starts) - 1
    first = order[starts]  # stable sort: the smallest row of each group
    out = np.empty(count, dtype=np.int64)
    out[order] = first[group]
    return out


def identity(count: int) -> np.ndarray:
    """The sources of a run that embeds every row (``--no-dedup``): each row its own."""
    return np.arange(count, dtype=np.int64)


def distinct_rows(source: np.ndarray) -> np.ndarray:
    """The rows that are their own source (the distinct sequences), ascending."""
    return np.flatnonzero(source == np.arange(len(source)))


def summary(rows: int, distinct: int) -> str:
    """``N sequences, D distinct (x% duplicates)``, as the report and attributes say it."""
    share = (rows - distinct) / rows if rows else 0.0
    return f"{rows:,} sequences, {distinct:,} distinct ({share:.1%} duplicates)"
