"""Long reads cut into pieces of N bases, as VirNucPro's ``split_fasta_chunk`` means to."""

from __future__ import annotations

import numpy as np
import pytest

from virnuc_dask.inputs.split import split_starts


def virnucpro_pieces(length: int, size: int) -> list[tuple[int, int]]:
    """VirNucPro's ``split_fasta_chunk`` arithmetic, transcribed: each piece's bases."""
    n = -(-length // size)
    repeat = n * size - length
    lower = int(repeat / n)
    need = repeat - lower * (n - 1)
    overlaps = [lower + 1] * need + [lower] * (n - 1 - need) + [0]
    pieces, move = [], 0
    for a, b in zip(range(0, length, size), overlaps, strict=False):
        start = a - move if a > 1 else a
        pieces.append((start, min(start + size, length)))
        move += b
    return pieces


def pieces(length: int, size: int) -> list[tuple[int, int]]:
    sequence, start, number = split_starts(np.array([length]), size)
    assert sequence.tolist() == [0] * len(start)
    assert number.tolist() == list(range(1, len(start) + 1))
    return [(s, s + min(size, length)) for s in start.tolist()]


@pytest.mark.parametrize("size", [3, 7, 150, 300, 500])
def test_pieces_of_n_bases_cover_the_read_with_even_overlaps(size):
    same = 0
    for length in range(1, 4 * size + 3):
        cut = pieces(length, size)
        assert len(cut) == max(1, -(-length // size))
        assert cut[0][0] == 0 and cut[-1][1] == length
        assert all(end - start == min(size, length) for start, end in cut)
        overlaps = [a[1] - b[0] for a, b in zip(cut, cut[1:], strict=False)]
        assert all(o >= 0 for o in overlaps)
        if overlaps:  # spread evenly, the larger ones first
            assert max(overlaps) - min(overlaps) <= 1
            assert overlaps == sorted(overlaps, reverse=True)
        # Where VirNucPro's own arithmetic gives full pieces, the pieces are its pieces.
        theirs = virnucpro_pieces(length, size)
        if theirs[-1][1] - theirs[-1][0] == min(size, length):
            assert cut == theirs, length
            same += 1
    assert same > size  # reads up to N bases and many others


def test_a_length_where_virnucpro_cuts_a_short_last_piece():
    assert virnucpro_pieces(1000, 300) == [(0, 300), (249, 549), (498, 798), (747, 1000)]
    assert pieces(1000, 300) == [(0, 300), (233, 533), (466, 766), (700, 1000)]


def test_many_reads_at_once():
    length = np.array([10, 3, 25, 7])
    sequence, start, number = split_starts(length, 7)
    assert sequence.tolist() == [0, 0, 1, 2, 2, 2, 2, 3]
    assert number.tolist() == [1, 2, 1, 1, 2, 3, 4, 1]
    assert start.tolist() == [0, 3, 0, 0, 6, 12, 18, 0]
