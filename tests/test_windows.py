"""Windows and per-residue values: fair-esm's per-token representations, blended by hand.

Per-residue rows of both engines equal fair-esm's representations at positions 1..n (fp32, 1e-5
relative per row, before any float16 cast); a long sequence's windows are blended as written in
:mod:`virnuc_dask.windows`, checked here against each window run alone through fair-esm; and a
sequence that fits one window gives the same bits in both modes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import (
    TINY,
    assert_rows_close,
    collect_residues,
    fair_esm_residues,
    random_sequences,
)
from virnuc_dask.engine.blend import blend_weights, plan_segments
from virnuc_dask.engine.packed import PackedEngine
from virnuc_dask.engine.reference import ReferenceEngine
from virnuc_dask.model.checkpoint import resolve_weights
from virnuc_dask.model.loading import load_model
from virnuc_dask.plan.windows import model_tokens, window_counts, window_starts

LENGTHS = [1, 2, 1021, 1022, 1023, 3000]
LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def engines():
    """The reference engine and the packed one (fp32, CPU) on the same seed-0 weights."""
    source = resolve_weights(TINY, random_weights=True, seed=0)
    reference = ReferenceEngine(load_model(source), layers=LAYERS, tokens_per_batch=4096)
    packed = PackedEngine(
        load_model(source), layers=LAYERS, dtype=torch.float32, tokens_per_batch=4096
    )
    return reference, packed


@pytest.fixture(scope="module")
def sample():
    return [random_sequences(1, n, n, seed=n)[0] for n in LENGTHS]


def test_window_plan():
    assert window_starts(1022).tolist() == [0]
    assert window_starts(2000).tolist() == [0, 489, 978]
    starts = window_starts(50_000)
    assert len(starts) == window_counts(np.array([50_000]), long="window")[0] == 97
    assert starts[-1] + 1022 == 50_000 and np.diff(starts).max() <= 511
    assert window_counts(np.array([5, 50_000])).tolist() == [1, 1]  # truncate
    assert model_tokens(np.array([5, 1500]), long="window").tolist() == [7, 2 * 1024]
    plan = plan_segments(np.array([3, 2000, 7]), long="window")
    assert plan.sequence.tolist() == [0, 1, 1, 1, 2]
    assert plan.lengths.tolist() == [3, 1022, 1022, 1022, 7]


def test_blend_weights_sum_to_one_and_are_exactly_one_where_one_window_covers():
    starts = window_starts(2000)
    weights = blend_weights(starts, 1022, 2000)
    total = np.zeros(2000)
    for s, w in zip(starts, weights, strict=True):
        total[s : s + 1022] += w
    np.testing.assert_allclose(total, 1.0, rtol=1e-12)
    assert (weights[0, :489] == 1.0).all() and (weights[2, 1511 - 978 :] == 1.0).all()
    # Linear fade: the middle window's weight peaks at its centre.
    assert weights[1].argmax() in (510, 511)


@pytest.mark.parametrize("which", ["reference", "packed"])
def test_per_residue_equals_fair_esm_at_boundary_lengths(engines, sample, which, tiny_model):
    engine = dict(zip(["reference", "packed"], engines, strict=True))[which]
    encoded = [s.encode() for s in sample]
    pooled, rows = collect_residues(engine, encoded, residue_dtype="float32")
    assert sorted(rows) == list(range(len(sample)))
    for i, seq in enumerate(sample):
        expected = fair_esm_residues(tiny_model, seq, LAYERS)
        assert rows[i].shape == (min(len(seq), 1022), 3, 64) and rows[i].dtype == np.float32
        assert_rows_close(rows[i], expected, rtol=1e-5)
        # The pooled vector is the mean of the residues' rows.
        assert_rows_close(pooled[i][None], rows[i].mean(0)[None], rtol=1e-5)
    # float16 storage is the float32 rows rounded, nothing else.
    _, half = collect_residues(engine, encoded[:3], residue_dtype="float16")
    for i in range(3):
        assert half[i].dtype == np.float16
        np.testing.assert_array_equal(half[i], rows[i].astype(np.float16))


def test_a_shuffled_residue_row_fails_the_comparison(engines, tiny_model):
    # Neighbouring residues of one sequence are the hardest rows to tell apart.
    seq = random_sequences(1, 300, 300, seed=21)[0]
    _, rows = collect_residues(engines[1], [seq.encode()], residue_dtype="float32")
    expected = fair_esm_residues(tiny_model, seq, LAYERS)
    assert_rows_close(rows[0], expected, rtol=1e-5)
    swapped = rows[0].copy()
    swapped[[100, 101]] = swapped[[101, 100]]
    with pytest.raises(AssertionError):
        assert_rows_close(swapped, expected, rtol=1e-5)


@pytest.mark.parametrize("which", [0, 1])
def test_windows_of_2000_residues_blend_as_written(engines, tiny_model, which):
    engine = engines[which]
    seq = random_sequences(1, 2000, 2000, seed=2000)[0]
    pooled, rows = collect_residues(engine, [seq.encode()], long="window", residue_dtype="float32")
    blended = rows[0]
    assert blended.shape == (2000, 3, 64)
    # Each window alone through fair-esm, and the weights by hand: linear in the distance to
    # the window's nearer edge, divided by their sum where windows overlap.
    starts = [0, 489, 978]
    alone = [fair_esm_residues(tiny_model, seq[s : s + 1022], LAYERS) for s in starts]
    raw = np.minimum(np.arange(1022) + 1, 1022 - np.arange(1022)).astype(np.float64)
    total = np.zeros(2000)
    for s in starts:
        total[s : s + 1022] += raw
    expected = np.zeros((2000, 3, 64))
    for s, window in zip(starts, alone, strict=True):
        expected[s : s + 1022] += (raw / total[s : s + 1022])[:, None, None] * window
    assert_rows_close(blended, expected.astype(np.float32), rtol=1e-5)
    # Residues covered by one window hold that window's output.
    assert_rows_close(blended[:489], alone[0][:489], rtol=1e-5)
    assert_rows_close(blended[1511:], alone[2][1511 - 978 :], rtol=1e-5)
    # The pooled vector is the mean over all residues of the blended rows.
    assert_rows_close(pooled, blended.mean(0)[None], rtol=1e-5)
    with pytest.raises(AssertionError):
        assert_rows_close(blended[::-1], expected.astype(np.float32), rtol=1e-5)


@pytest.mark.parametrize("which", [0, 1])
def test_sequences_that_fit_give_the_same_bits_in_both_modes(engines, which):
    engine = engines[which]
    seqs = [s.encode() for s in random_sequences(20, 1, 1022, seed=31)] + [b"A" * 1022]
    pooled_t, rows_t = collect_residues(engine, seqs, residue_dtype="float32")
    pooled_w, rows_w = collect_residues(engine, seqs, long="window", residue_dtype="float32")
    np.testing.assert_array_equal(pooled_t, pooled_w)
    for i in range(len(seqs)):
        np.testing.assert_array_equal(rows_t[i], rows_w[i])
    # Without per-residue output, the pooled vectors are those of the per-residue run.
    np.testing.assert_array_equal(engine.embed(seqs, long="window"), pooled_t)


def test_truncate_embeds_the_first_window_and_window_mode_everything(engines):
    seq = random_sequences(1, 1500, 1500, seed=15)[0].encode()
    _, cut = collect_residues(engines[1], [seq, seq[:1022]], residue_dtype="float32")
    np.testing.assert_array_equal(cut[0], cut[1])
    _, whole = collect_residues(engines[1], [seq], long="window", residue_dtype="float32")
    assert whole[0].shape[0] == 1500


def test_a_50000_residue_protein_in_windows_splits_over_batches(engines):
    # 97 windows of 1,024 tokens: about 100,000 tokens over batches of 16,384, blended on the
    # host in one float32 buffer of the protein's rows.
    seq = random_sequences(1, 50_000, 50_000, seed=50)[0].encode()
    engine = PackedEngine(engines[1].model, layers=[2], dtype=torch.float32)
    batches = []
    pooled, rows = collect_residues(
        engine, [seq, b"MKV"], long="window", on_batch=batches.append, residue_dtype="float16"
    )
    assert len(batches) >= 6 and sum(batches) == 97 * 1024 + 5
    assert rows[0].shape == (50_000, 1, 64) and np.isfinite(rows[0]).all()
    assert_rows_close(pooled[:1], rows[0].astype(np.float32).mean(0)[None], rtol=2e-3)
