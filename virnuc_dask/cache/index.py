"""The digests of a namespace's entries, sorted for a vectorised lookup.

A lookup of a million digests against a million cached ones must take about a second, so
nothing here loops in Python per digest.

Decisions:

- **Two 64-bit keys**: each 16-byte digest is read as two big-endian ``uint64`` (``hi``,
  ``lo``), sorted by ``(hi, lo)`` with one ``np.lexsort``, and a lookup is one
  ``np.searchsorted`` on ``hi`` and one comparison of ``lo``. Cached digests that share
  their first 8 bytes (a chance of about 3 in 10^8 among a million digests, or digests made
  so) are told apart by ``lo`` in a second step over just the lookups that meet them.
- **The oldest entry wins**: entries come in age order and the sort is stable, so where two
  entries hold one digest (two runs added it at once), the first of its run of equal keys is
  the oldest entry's, and only that one is kept.
"""

from __future__ import annotations

import numpy as np

from virnuc_dask.cache.entries import DIGEST_SIZE


def digest_keys(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two ``uint64`` keys of each ``(n, 16)`` uint8 digest: its first and last 8 bytes."""
    digests = np.ascontiguousarray(digests, dtype=np.uint8)
    if digests.ndim != 2 or digests.shape[1] != DIGEST_SIZE:
        raise ValueError(f"digests must be (n, {DIGEST_SIZE}) uint8, not {digests.shape}")
    pairs = digests.view(">u8").astype(np.uint64)
    return pairs[:, 0], pairs[:, 1]


class DigestIndex:
    """Where each distinct digest of a list of entries lies: its entry and its row.

    Parameters
    ----------
    digests
        Each entry's ``(rows, 16)`` digests, oldest entry first.
    """

    def __init__(self, digests: list[np.ndarray]) -> None:
        sizes = np.array([len(d) for d in digests], dtype=np.int64)
        every = np.concatenate(digests) if digests else np.empty((0, DIGEST_SIZE), dtype=np.uint8)
        hi, lo = digest_keys(every)
        order = np.lexsort((lo, hi))  # stable: the oldest entry first among equal digests
        hi, lo = hi[order], lo[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        order = order[first]
        self.hi, self.lo = hi[first], lo[first]
        # The entry and row of each kept digest, from its place in the concatenation.
        starts = np.concatenate([[0], np.cumsum(sizes)])
        self.entry = (np.searchsorted(starts, order, side="right") - 1).astype(np.int64)
        self.row = order - starts[self.entry]

    def __len__(self) -> int:
        return len(self.hi)

    def find(self, digests: np.ndarray) -> np.ndarray:
        """For each digest, its place in this index, or -1 where it is not cached."""
        hi, lo = digest_keys(digests)
        size = len(self.hi)
        if size == 0:
            return np.full(len(hi), -1, dtype=np.int64)
        left = np.searchsorted(self.hi, hi, side="left")
        at = np.minimum(left, size - 1)
        where = np.where((self.hi[at] == hi) & (self.lo[at] == lo), at, -1)
        # Lookups whose first 8 bytes match more than one cached digest: find lo among those.
        after = np.minimum(left + 1, size - 1)
        shared = np.flatnonzero((where < 0) & (self.hi[at] == hi) & (self.hi[after] == hi))
        for i in shared:
            run_end = np.searchsorted(self.hi, hi[i], side="right")
            within = left[i] + np.searchsorted(self.lo[left[i] : run_end], lo[i])
            if within < run_end and self.lo[within] == lo[i]:
                where[i] = within
        return where
