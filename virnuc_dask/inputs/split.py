"""Splitting long sequences into pieces of a fixed size, as VirNucPro's ``split_fasta_chunk``.

A sequence of ``L`` bases becomes ``n = ceil(L / N)`` pieces of exactly ``N`` bases (one
piece, the whole sequence, when ``L <= N``), named ``<id>_chunk_<k>`` for ``k = 1 .. n``. The
pieces cover the sequence from its first base to its last; the ``n * N - L`` bases they share
are spread as evenly as whole bases allow over the ``n - 1`` overlaps, the larger overlaps
first: ``R = n * N - L`` gives ``R mod (n - 1)`` overlaps of ``R // (n - 1) + 1`` bases, then
overlaps of ``R // (n - 1)``.

VirNucPro means the same and gets it for some lengths only: it computes the base overlap as
``int(R / n)`` where the ``n - 1`` overlaps need ``R / (n - 1)``. Whenever its last piece has
``N`` bases, its pieces are exactly these; for the other lengths (most of them) its overlaps
come out too small and its last piece shorter than ``N`` (for ``L = 1000``, ``N = 300`` it
cuts at 0, 249, 498 and 747, the last piece 253 bases long; here at 0, 233, 466 and 700).
``docs/decisions.md`` says why we do not reproduce that.
"""

from __future__ import annotations

import numpy as np


def split_starts(length: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces of sequences of ``length`` bases: which sequence, first base, and piece number.

    Parameters
    ----------
    length
        Bases per sequence (int).
    size
        Bases per piece, ``N``.

    Returns
    -------
    sequence, start, piece
        Per piece, in order (sequence, piece): the sequence's number, the piece's first base
        in it (0-based), and the piece's number ``k`` (1-based). A piece has
        ``min(size, length)`` bases.
    """
    if size < 1:
        raise ValueError("pieces must have at least one base")
    length = np.asarray(length, dtype=np.int64)
    pieces = np.maximum(1, -(-length // size))
    sequence = np.repeat(np.arange(len(length)), pieces)
    first = np.cumsum(pieces) - pieces
    k = np.arange(len(sequence), dtype=np.int64) - first[sequence]  # 0-based piece number
    n = pieces[sequence]
    shared = n * size - length[sequence]
    gaps = np.maximum(n - 1, 1)
    base, larger = shared // gaps, shared % gaps
    # Bases shared by pieces 0..k-1 with their successors: k overlaps, the first ``larger``
    # of them one base longer.
    overlap = k * base + np.minimum(k, larger)
    start = k * size - overlap
    return sequence, start, (k + 1).astype(np.int32)
