"""The packed engine equals the reference engine: to 1e-5 in fp32 on the CPU, and within bf16's
error (cosine >= 0.9999, relative error <= 1%) on a GPU.

Random-weight embeddings of different sequences reach cosine 0.991, so alignment is checked
with a tight relative tolerance, and a test proves that tolerance rejects swapped rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import TINY, assert_rows_close, collect_residues, random_sequences
from virnuc_dask.engine.batching import (
    MAX_AUTO_TOKENS,
    MIN_AUTO_TOKENS,
    auto_token_budget,
    token_budget_batches,
)
from virnuc_dask.engine.layers import fuse_qkv
from virnuc_dask.engine.packed import PackedEngine
from virnuc_dask.engine.packing import pack_batch
from virnuc_dask.engine.reference import ReferenceEngine
from virnuc_dask.model.checkpoint import resolve_weights
from virnuc_dask.model.loading import load_model
from virnuc_dask.model.tokens import padded_tokens

LENGTHS = [1, 2, 3, 7, 30, 100, 255, 256, 257, 500, 1000, 1021, 1022, 1023, 1200, 1500]


def encoded(sequences: list[str]) -> list[bytes]:
    return [s.encode() for s in sequences]


def lengths_sample(seed: int) -> list[bytes]:
    """Boundary lengths (truncation at 1022 included) and 30 random ones up to 1500."""
    seqs = [random_sequences(1, n, n, seed=n)[0] for n in LENGTHS]
    return encoded(seqs + random_sequences(30, 1, 1500, seed=seed))


@pytest.fixture(scope="module")
def model():
    """A private tiny model: the engine fuses its q/k/v storage; the shared one stays as is."""
    return load_model(resolve_weights(TINY, random_weights=True, seed=0))


def test_pack_batch_restarts_positions_and_drops_bos_eos_from_pooling():
    packed = pack_batch([b"ACD", b"K", b"MNPQ"], max_residues=3)
    np.testing.assert_array_equal(packed.cu_seqlens, [0, 5, 8, 13])
    np.testing.assert_array_equal(packed.positions, [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(packed.segments, [3, 0, 0, 0, 3, 3, 1, 3, 3, 2, 2, 2, 3])
    np.testing.assert_array_equal(packed.residues, [3, 1, 3])
    assert packed.max_len == 5


def test_matches_reference_across_lengths_and_layers(model):
    seqs = lengths_sample(seed=1)
    layers = [0, 1, 2]
    expected = ReferenceEngine(model, layers=layers, tokens_per_batch=4096).embed(seqs)
    engine = PackedEngine(model, layers=layers, dtype=torch.float32, tokens_per_batch=4096)
    actual = engine.embed(seqs)
    assert actual.shape == (len(seqs), 3, 64) and actual.dtype == np.float32
    assert_rows_close(actual, expected, rtol=1e-5)


def test_layers_in_any_order_and_truncation(model):
    seq = random_sequences(1, 1400, 1400, seed=9)[0]
    engine = PackedEngine(model, layers=[2, 0], dtype=torch.float32)
    full, cut = engine.embed([seq.encode(), seq[:1022].encode()])
    assert_rows_close(full[None], cut[None], rtol=1e-6)
    expected = ReferenceEngine(model, layers=[2, 0]).embed([seq.encode()])
    assert_rows_close(full[None], expected, rtol=1e-5)


def test_rows_keep_input_order_over_many_batches(model):
    seqs = encoded(random_sequences(400, 1, 200, seed=4))
    budget = 768
    residues = np.array([len(s) for s in seqs])
    assert len(token_budget_batches(np.sort(residues)[::-1] + 2, budget, padded=False)) >= 50
    expected = ReferenceEngine(model, layers=[2]).embed(seqs)
    actual = PackedEngine(model, layers=[2], dtype=torch.float32, tokens_per_batch=budget).embed(
        seqs
    )
    assert_rows_close(actual, expected, rtol=1e-5)


def test_tolerance_rejects_swapped_rows(model):
    # Sequences of near-equal length are the hardest to tell apart; if the tolerance of the
    # tests above were loosened until swapped rows passed, they would prove nothing.
    seqs = encoded(random_sequences(12, 100, 110, seed=5))
    actual = PackedEngine(model, layers=[2], dtype=torch.float32).embed(seqs)
    expected = ReferenceEngine(model, layers=[2]).embed(seqs)
    assert_rows_close(actual, expected, rtol=1e-5)
    with pytest.raises(AssertionError):
        assert_rows_close(actual[[1, 0, *range(2, 12)]], expected, rtol=1e-5)


def test_out_of_memory_splits_the_batch_and_continues(model, monkeypatch, caplog):
    seqs = encoded(random_sequences(40, 20, 60, seed=6))
    engine = PackedEngine(model, layers=[2], dtype=torch.float32, tokens_per_batch=1000)
    forward = engine._forward

    def forward_small_batches_only(staged):
        if len(staged.rows) > 3:
            raise torch.OutOfMemoryError("injected: batch too large")
        return forward(staged)

    monkeypatch.setattr(engine, "_forward", forward_small_batches_only)
    actual = engine.embed(seqs)
    assert engine.oom_splits >= 10
    assert "splitting it in two" in caplog.text
    assert_rows_close(actual, ReferenceEngine(model, layers=[2]).embed(seqs), rtol=1e-5)


def test_out_of_memory_on_one_sequence_is_raised(model, monkeypatch):
    engine = PackedEngine(model, layers=[2], dtype=torch.float32)

    def no_memory(staged):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(engine, "_forward", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        engine.embed([b"ACDE", b"KLM"])


def test_fused_qkv_are_views_and_fair_esm_forward_is_unchanged():
    model = load_model(resolve_weights(TINY, random_weights=True, seed=2))
    tokens = torch.from_numpy(padded_tokens([b"MKTAYIAK", b"GG"]))
    with torch.inference_mode():
        before = model(tokens)["logits"]
    attention = model.layers[0].self_attn
    weight, bias = fuse_qkv(attention)
    dim = model.embed_dim
    assert weight.shape == (3 * dim, dim) and bias.shape == (3 * dim,)
    for i, projection in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
        assert projection.weight.data_ptr() == weight[i * dim].data_ptr()
        assert projection.bias.data_ptr() == bias[i * dim :].data_ptr()
    again, _ = fuse_qkv(attention)
    assert again.data_ptr() == weight.data_ptr()
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens)["logits"], before, rtol=0, atol=0)


def test_auto_token_budget_is_bounded():
    assert auto_token_budget(0, 2560, 2) == MIN_AUTO_TOKENS
    assert auto_token_budget(140 * 2**30, 320, 2) == MAX_AUTO_TOKENS
    middle = auto_token_budget(4 * 2**30, 2560, 2)
    assert MIN_AUTO_TOKENS < middle < MAX_AUTO_TOKENS and middle % 1024 == 0


def test_empty_input_and_bad_layers(model):
    engine = PackedEngine(model, layers=[1, 2], dtype=torch.float32)
    assert engine.embed([]).shape == (0, 2, 64)
    with pytest.raises(ValueError, match="layers"):
        PackedEngine(model, layers=[3], dtype=torch.float32)


def test_empty_input_still_checks_long(model):
    # The reference engine refuses an unknown ``long`` whatever the input; so does this one.
    engine = PackedEngine(model, layers=[2], dtype=torch.float32)
    with pytest.raises(ValueError, match="long must be one of"):
        engine.embed([], long="wrap")


# GPU: bf16/fp16 packed engine against the fp32 reference on the same weights. ------------------

GPU_MODEL = "esm2_t6_8M_UR50D"


def fidelity(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """Smallest cosine and largest relative error (``||a - b|| / ||b||``) over rows."""
    a = actual.reshape(len(actual), -1).astype(np.float64)
    b = expected.reshape(len(expected), -1).astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    error = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    return float(cosine.min()), float(error.max())


def assert_faithful(actual: np.ndarray, expected: np.ndarray) -> None:
    cosine, error = fidelity(actual, expected)
    assert cosine >= 0.9999 and error <= 0.01, f"min cosine {cosine:.6f}, max rel error {error:.4f}"


@pytest.fixture(scope="module")
def gpu_models():
    """The same random weights twice on the GPU: fp32 for the reference, one for the engine."""
    source = resolve_weights(GPU_MODEL, random_weights=True, seed=0)
    reference = load_model(source).cuda()
    return reference, load_model(source).cuda()


@pytest.mark.gpu
def test_gpu_bf16_matches_fp32_reference_across_lengths(gpu_models):
    reference, model = gpu_models
    seqs = lengths_sample(seed=7)
    expected = ReferenceEngine(reference, layers=[6]).embed(seqs)
    actual = PackedEngine(model, layers=[6], dtype=torch.bfloat16).embed(seqs)
    assert_faithful(actual, expected)


@pytest.mark.gpu
def test_gpu_many_batches_and_budgets_agree(gpu_models):
    reference, model = gpu_models
    seqs = encoded(random_sequences(600, 60, 170, seed=8))
    expected = ReferenceEngine(reference, layers=[5, 6]).embed(seqs)
    small = PackedEngine(model, layers=[5, 6], tokens_per_batch=1024)
    residues = np.sort([len(s) for s in seqs])[::-1]
    assert len(token_budget_batches(residues + 2, small.tokens_per_batch, padded=False)) >= 50
    by_small = small.embed(seqs)
    by_auto = PackedEngine(model, layers=[5, 6]).embed(seqs)  # fused kernels
    by_compiled = PackedEngine(model, layers=[5, 6], compile=True).embed(seqs)
    by_eager = PackedEngine(model, layers=[5, 6], compile=False, fused=False).embed(seqs)
    for actual in (by_small, by_auto, by_compiled, by_eager):
        assert_faithful(actual, expected)
    assert_faithful(by_small, by_auto)


@pytest.mark.gpu
def test_gpu_fp16_matches_fp32_reference():
    source = resolve_weights(GPU_MODEL, random_weights=True, seed=1)
    seqs = lengths_sample(seed=10)
    expected = ReferenceEngine(load_model(source).cuda(), layers=[6]).embed(seqs)
    engine = PackedEngine(load_model(source).cuda(), layers=[6], dtype=torch.float16)
    assert engine.compile_seconds > 0
    assert_faithful(engine.embed(seqs), expected)


@pytest.mark.gpu
def test_gpu_bf16_per_residue_matches_fp32_reference(gpu_models):
    # Per residue, the bf16 path (rows cast to float16 on the device) against fp32 fair-esm
    # on the same weights: min cosine >= 0.999 for every residue, windows included.
    reference, model = gpu_models
    seqs = [random_sequences(1, n, n, seed=n)[0] for n in (1, 2, 100, 1021, 1022, 1023, 3000)]
    seqs = encoded(seqs + random_sequences(300, 50, 170, seed=12))
    engine = PackedEngine(model, layers=[5, 6], tokens_per_batch=8192, compile=False)
    for long in ("truncate", "window"):
        _, expected = collect_residues(
            ReferenceEngine(reference, layers=[5, 6]), seqs, long=long, residue_dtype="float32"
        )
        _, actual = collect_residues(engine, seqs, long=long)
        assert sorted(actual) == list(range(len(seqs)))
        every = np.concatenate([actual[i] for i in range(len(seqs))]).astype(np.float32)
        truth = np.concatenate([expected[i] for i in range(len(seqs))])
        assert every.dtype == np.float32 and actual[0].dtype == np.float16
        for layer in range(2):
            cosine, error = fidelity(every[:, layer], truth[:, layer])
            assert cosine >= 0.999, f"{long}, layer {layer}: min cosine per residue {cosine:.5f}"
            # Rows one residue off would be caught: their worst error is far larger.
            _, shifted = fidelity(np.roll(every[:, layer], 1, axis=0), truth[:, layer])
            assert shifted > 2 * error


@pytest.mark.gpu
def test_gpu_a_50000_residue_protein_in_windows_with_esm2_3b():
    # The memory case of --long window on one GPU: ESM-2 3B's width and depth (random weights,
    # drawn on the device), 97 windows spread over packed batches, per-residue rows blended
    # on the host; the peak stays far below an H200's memory and every row is finite.
    from virnuc_dask.model.loading import _esm2, _no_initialisation
    from virnuc_dask.model.registry import model_spec

    if torch.cuda.get_device_properties(0).total_memory < 40e9:
        pytest.skip("needs a GPU with 40 GB for ESM-2 3B")
    with _no_initialisation():
        model = _esm2(model_spec("esm2_t36_3B_UR50D"), token_dropout=True)
    model = model.to("cuda", torch.bfloat16).eval()
    generator = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
    engine = PackedEngine(model, layers=[36], compile=False)
    torch.cuda.reset_peak_memory_stats()
    sequence = random_sequences(1, 50_000, 50_000, seed=50)[0].encode()
    pooled, rows = collect_residues(engine, [sequence], long="window")
    peak = torch.cuda.max_memory_allocated()
    assert rows[0].shape == (50_000, 1, 2560) and np.isfinite(rows[0]).all()
    assert np.isfinite(pooled).all() and pooled.shape == (1, 1, 2560)
    np.testing.assert_allclose(
        pooled[0, 0], rows[0][:, 0].astype(np.float32).mean(0), rtol=1e-2, atol=1e-3
    )
    print(f"50,000 residues, 3B: peak GPU memory {peak / 2**30:.1f} GiB")
    assert peak < 60 * 2**30
