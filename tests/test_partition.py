"""Partition: every sequence once, longest first per lane, balanced lanes, budgeted chunks."""

import numpy as np
import pytest

from virnuc_dask.plan.partition import partition, sequence_tokens


@pytest.fixture
def lengths():
    rng = np.random.default_rng(0)
    return np.clip(rng.lognormal(np.log(300), 0.6, 5000), 30, 3000).astype(np.int64)


def test_every_sequence_exactly_once(lengths):
    parts = partition(lengths, lanes=3, chunk_tokens=20_000)
    covered = np.concatenate([parts.order[c.start : c.stop] for c in parts.chunks])
    assert np.array_equal(np.sort(covered), np.arange(len(lengths)))


def test_lanes_are_balanced_within_ten_percent(lengths):
    for lanes in (2, 3, 4, 8):
        parts = partition(lengths, lanes=lanes, chunk_tokens=50_000)
        totals = parts.lane_tokens()
        assert np.abs(totals / totals.mean() - 1).max() < 0.10
        assert parts.balance() < 1.10


def test_each_lane_is_longest_first_and_chunks_respect_budget(lengths):
    budget = 30_000
    parts = partition(lengths, lanes=2, chunk_tokens=budget)
    tokens = sequence_tokens(lengths)
    for chunk in parts.chunks:
        t = tokens[parts.order[chunk.start : chunk.stop]]
        assert np.all(np.diff(t) <= 0)
        assert chunk.tokens == t.sum()
        assert chunk.tokens <= budget + t.max()


def test_chunks_of_a_lane_have_similar_sizes(lengths):
    parts = partition(lengths, lanes=2, chunk_tokens=100_000)
    last = {c.lane: c.number for c in parts.chunks}  # each lane's last chunk is the remainder
    full = [c.tokens for c in parts.chunks if c.number not in last.values()]
    assert len(full) > 10
    assert max(full) / min(full) < 1.1


def test_truncation_caps_tokens():
    assert sequence_tokens(np.array([1, 1022, 5000])).tolist() == [3, 1024, 1024]


def test_more_lanes_than_sequences():
    parts = partition(np.array([5, 9]), lanes=4, chunk_tokens=100)
    assert sorted(np.concatenate([parts.order[c.start : c.stop] for c in parts.chunks])) == [0, 1]
    assert len(parts.chunks) == 2
