"""The fused Triton kernels compute what the eager torch code computes (GPU only).

Each comparison is paired with a perturbation that must fail it: positions off by one for
the rotation, another row's residual for the layer norm.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_packed import GPU_MODEL, assert_faithful, encoded, lengths_sample
from virnuc_dask.engine.layers import (
    apply_rotary,
    fuse_qkv,
    fused_layer,
    packed_layer,
    rotary_tables,
)
from virnuc_dask.engine.packed import PackedEngine
from virnuc_dask.engine.reference import ReferenceEngine
from virnuc_dask.model.checkpoint import resolve_weights
from virnuc_dask.model.loading import load_model

pytestmark = pytest.mark.gpu


def assert_same_roundings(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal but for a rare last-bit difference (a fused multiply-add rounds once, not twice).

    Values are of order 1; one bf16 step there is 2**-7, and 99% of elements must be equal.
    """
    torch.testing.assert_close(ours.float(), expected.float(), rtol=2**-7, atol=2**-7)
    assert (ours == expected).float().mean() > 0.99


@pytest.mark.parametrize(
    ("heads", "head_dim"),
    [(40, 64), (20, 24), (4, 16)],  # 3B and 650M; 35M (24 features a head); the tiny model
)
def test_rotary_qk_equals_the_eager_rotation(heads, head_dim):
    from virnuc_dask.engine.kernels import rotary_qk

    torch.manual_seed(0)
    tokens = 3001
    qkv = torch.randn(tokens, 3 * heads * head_dim, device="cuda").bfloat16()
    positions = torch.randint(0, 1024, (tokens,), device="cuda", dtype=torch.int32)
    table = rotary_tables(head_dim, 1024, torch.device("cuda"))
    q, k = rotary_qk(qkv, table, positions, heads)
    gathered = table[:, positions]
    eager_q, eager_k, _ = qkv.view(tokens, 3, heads, head_dim).unbind(1)
    for ours, theirs in ((q, eager_q), (k, eager_k)):
        expected = apply_rotary(theirs, gathered[0], gathered[1]).bfloat16()
        assert ours.shape == expected.shape and ours.is_contiguous()
        assert_same_roundings(ours, expected)
    shifted = rotary_qk(qkv, table, (positions + 1) % 1024, heads)[0]
    with pytest.raises(AssertionError):
        assert_same_roundings(shifted, apply_rotary(eager_q, gathered[0], gathered[1]).bfloat16())


def test_add_layer_norm_equals_add_then_norm():
    from virnuc_dask.engine.kernels import add_layer_norm

    torch.manual_seed(1)
    for dim in (320, 1280, 2560):
        x = torch.randn(777, dim, device="cuda").bfloat16()
        delta = torch.randn(777, dim, device="cuda").bfloat16()
        norm = torch.nn.LayerNorm(dim).cuda().bfloat16()
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
            total, normed = add_layer_norm(x, delta, norm)
            expected_total = x + delta
            expected = norm(expected_total)
            assert torch.equal(total, expected_total)
            assert_same_roundings(normed, expected)
            wrong = add_layer_norm(x, delta.roll(1, 0), norm)[1]
            with pytest.raises(AssertionError):
                assert_same_roundings(wrong, expected)


def test_fused_layer_equals_the_packed_layer():
    model = load_model(resolve_weights(GPU_MODEL, random_weights=True, seed=3)).cuda().bfloat16()
    layer = model.layers[0]
    weight, bias = fuse_qkv(layer.self_attn)
    lengths = [130, 1, 57, 1024, 300]
    positions = torch.cat([torch.arange(n) for n in lengths]).int().cuda()
    cu_seqlens = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32, device="cuda")
    table = rotary_tables(model.embed_dim // model.attention_heads, 1024, torch.device("cuda"))
    x = torch.randn(sum(lengths), model.embed_dim, device="cuda").bfloat16()
    with torch.inference_mode():
        args = (x, layer, weight, bias)
        expected = packed_layer(*args, table[:, positions], cu_seqlens, max(lengths))
        ours = fused_layer(*args, (table, positions), cu_seqlens, max(lengths))
        assert_faithful(ours.float().cpu().numpy(), expected.float().cpu().numpy())
        # Sequences cut at other places: attention over the wrong spans must fail the check.
        wrong_cuts = torch.tensor(np.cumsum([0, 131, *lengths[1:-1], 299]), device="cuda").int()
        wrong = fused_layer(*args, (table, positions), wrong_cuts, max(lengths))
        with pytest.raises(AssertionError):
            assert_faithful(wrong.float().cpu().numpy(), expected.float().cpu().numpy())
    assert F.cosine_similarity(ours.float(), expected.float()).min() > 0.999


def test_fused_engine_matches_fp32_reference_and_the_torch_path():
    source = resolve_weights(GPU_MODEL, random_weights=True, seed=4)
    seqs = lengths_sample(seed=11) + encoded(["MKT" * 40] * 3)
    expected = ReferenceEngine(load_model(source).cuda(), layers=[0, 3, 6]).embed(seqs)
    model = load_model(source).cuda()
    fused = PackedEngine(model, layers=[0, 3, 6], compile=False)
    assert fused.fused and not fused.compiled
    torch_path = PackedEngine(model, layers=[0, 3, 6], compile=False, fused=False)
    assert not torch_path.fused
    by_fused = fused.embed(seqs)
    assert_faithful(by_fused, expected)
    assert_faithful(by_fused, torch_path.embed(seqs))
    with pytest.raises(AssertionError):
        assert_faithful(by_fused[::-1], expected)


def test_an_engine_whose_fused_kernels_fail_runs_plain_torch(monkeypatch, caplog):
    # Triton needs a C compiler for its launcher: where building the kernels fails, the
    # engine logs it and runs the plain torch layer, with the same results.
    from virnuc_dask.engine import kernels

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment")

    source = resolve_weights(GPU_MODEL, random_weights=True, seed=5)
    seqs = lengths_sample(seed=13)
    expected = ReferenceEngine(load_model(source).cuda(), layers=[6]).embed(seqs)
    monkeypatch.setattr(kernels, "rotary_qk", broken)
    engine = PackedEngine(load_model(source).cuda(), layers=[6], compile=False)
    assert not engine.fused and not engine.compiles_by_default  # no compile either
    assert "could not run here (RuntimeError: Failed to find C compiler" in caplog.text
    assert_faithful(engine.embed(seqs), expected)
