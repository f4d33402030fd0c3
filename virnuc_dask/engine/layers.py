"""fair-esm's transformer layer on a packed token stream: rotary, attention, the layer itself.

The layers are fair-esm's own modules and weights, called in a different arrangement, on
``(tokens, dim)`` streams whose sequences lie back to back (``cu_seqlens``, see
:mod:`virnuc_dask.engine.packing`). Decisions:

- Attention runs over the packed stream with varlen (flash) attention, one segment per
  sequence; on the CPU, and for fp32, a loop of ``scaled_dot_product_attention`` over the
  segments stands in, so the packing logic is testable anywhere.
- Rotary positions restart at every sequence and are computed in fp32 (fair-esm computes them
  in the model's dtype, and bf16 rounds positions above 256).
- q, k and v come from one matmul whose weight is a single tensor; fair-esm's ``q_proj``,
  ``k_proj`` and ``v_proj`` parameters become views into it (:func:`fuse_qkv`), so the
  weights exist once.
- q is scaled by ``head_dim ** -0.5`` through the attention's softmax scale, which is the same
  product as fair-esm's scaling of q before the rotation (the rotation is linear).
- The layer module is an argument of :func:`packed_layer`, not looked up inside, so that
  ``torch.compile`` traces one graph for all layers (a per-layer lookup recompiled for every
  layer).
- torch's compiler stack is not imported until an engine first compiles
  (:func:`prepare_compiled_kernels`): its import costs seconds, and an eager engine calls the
  same flash kernel directly. Triton comes only with :mod:`virnuc_dask.engine.kernels`, which
  this module imports in :func:`fused_layer` alone.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

# torch >= 2.10 has varlen flash attention; without it the GPU path is unavailable and the
# CPU fallback still works. Found, not imported: see prepare_compiled_kernels.
HAS_VARLEN = importlib.util.find_spec("torch.nn.attention.varlen") is not None
# torch's varlen_attn custom op, set when an engine first compiles (see below).
_varlen_attn = None
_compiled_kernels_ready = False


def rotary_tables(head_dim: int, positions: int, device: torch.device) -> torch.Tensor:
    """Return fair-esm's rotary ``cos`` and ``sin`` in fp32, stacked: ``(2, positions, head_dim)``.

    The frequencies are fair-esm's (``10000 ** (-2i / head_dim)``, halves repeated); unlike
    fair-esm, the table is never cast to the model's dtype, so every position stays exact.
    """
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return torch.stack((angles.cos(), angles.sin())).to(device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(tokens, heads, head_dim)`` as fair-esm does, in fp32."""
    x = x.float()
    first, second = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-second, first), dim=-1) * sin[:, None]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int
) -> torch.Tensor:
    """Self-attention within each sequence of a packed stream, ``(tokens, heads, head_dim)``.

    Softmax scale ``head_dim ** -0.5``, no mask beyond the sequence boundaries. Flash varlen
    attention on CUDA in fp16/bf16; elsewhere one ``scaled_dot_product_attention`` per sequence.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if _varlen_attn is not None:
            return _varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
        # The kernel varlen_attn calls, with the arguments it passes (no dropout, no mask).
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, False, False
        )
        return out[0]
    return _looped_attention(q, k, v, cu_seqlens)


def prepare_compiled_kernels() -> None:
    """Set up attention for compiled engines (once per process, on the first compile).

    A compiled layer calls flash attention through torch's ``varlen_attn`` custom op, which
    the compiler knows how to trace, and keeps the CPU loop out of its graphs (traced, the
    loop would recompile for every count of sequences). Both need torch's compiler stack,
    whose import costs seconds: an eager engine (small jobs) calls the same flash kernel
    directly and never imports it.
    """
    global _varlen_attn, _looped_attention, _compiled_kernels_ready
    if _compiled_kernels_ready:
        return
    _looped_attention = torch.compiler.disable(_looped_attention)
    if HAS_VARLEN:
        from torch.nn.attention.varlen import varlen_attn

        _varlen_attn = varlen_attn
    _compiled_kernels_ready = True


def _looped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    bounds = cu_seqlens.tolist()
    parts = [
        F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
        ).transpose(0, 1)
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(parts)


def packed_layer(
    x: torch.Tensor,
    layer: torch.nn.Module,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    rotary: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
) -> torch.Tensor:
    """Run one fair-esm ``TransformerLayer`` on a packed stream ``x`` of shape ``(tokens, dim)``.

    The same computation as fair-esm's layer: pre-norm attention with rotary q and k, then a
    pre-norm erf-GELU feed-forward, each added to the residual. The layer module is an argument
    (not looked up inside) so that ``torch.compile`` traces one graph for all layers.

    Parameters
    ----------
    x
        Hidden states of the packed stream.
    layer
        A fair-esm ``TransformerLayer``.
    qkv_weight, qkv_bias
        The layer's q, k and v projections as one ``(3 * dim, dim)`` weight and its bias.
    rotary
        Per-token ``cos`` and ``sin``, fp32, shape ``(2, tokens, head_dim)``.
    cu_seqlens
        Offsets of the sequences in the stream (int32, on the device of ``x``).
    max_len
        Tokens of the longest sequence.
    """
    tokens, dim = x.shape
    heads = layer.attention_heads
    qkv = F.linear(layer.self_attn_layer_norm(x), qkv_weight, qkv_bias)
    q, k, v = qkv.view(tokens, 3, heads, dim // heads).unbind(1)
    cos, sin = rotary[0], rotary[1]
    q = apply_rotary(q, cos, sin).to(x.dtype)
    k = apply_rotary(k, cos, sin).to(x.dtype)
    attention = attend(q, k, v, cu_seqlens, max_len).reshape(tokens, dim)
    x = x + layer.self_attn.out_proj(attention)
    # F.gelu without approximation is fair-esm's erf GELU, in one kernel.
    return x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))


def fused_layer(
    x: torch.Tensor,
    layer: torch.nn.Module,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    cu_seqlens: torch.Tensor,
    max_len: int,
) -> torch.Tensor:
    """:func:`packed_layer` with its memory-bound steps in two Triton kernels (CUDA only).

    The rotation of q and k and the residual addition before the feed-forward's layer norm
    run as :func:`~virnuc_dask.engine.kernels.rotary_qk` and
    :func:`~virnuc_dask.engine.kernels.add_layer_norm`; the rest is the same torch code.
    ``rotary`` is the engine's fp32 table and the tokens' positions, not a gathered table.
    """
    # Imported here: the kernels module imports Triton, which only this path needs.
    from virnuc_dask.engine.kernels import add_layer_norm, rotary_qk

    tokens, dim = x.shape
    heads = layer.attention_heads
    qkv = F.linear(layer.self_attn_layer_norm(x), qkv_weight, qkv_bias)
    table, positions = rotary
    q, k = rotary_qk(qkv, table, positions, heads)
    v = qkv.view(tokens, 3, heads, dim // heads)[:, 2]
    attention = attend(q, k, v, cu_seqlens, max_len).reshape(tokens, dim)
    x, normed = add_layer_norm(x, layer.self_attn.out_proj(attention), layer.final_layer_norm)
    return x + layer.fc2(F.gelu(layer.fc1(normed)))


def fuse_qkv(attention: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Give a fair-esm attention module's q, k and v projections one storage; return it.

    Returns the fused ``(3 * dim, dim)`` weight and ``(3 * dim,)`` bias. Afterwards the module's
    ``q_proj``, ``k_proj`` and ``v_proj`` parameters are views into these tensors, so the
    weights exist once and fair-esm's own forward still works. Calling it again on the same
    module returns the same storage without copying.
    """
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    fused = []
    for name in ("weight", "bias"):
        parts = [getattr(p, name) for p in projections]
        whole = _adjacent_view(parts)
        if whole is None:
            with torch.no_grad():
                whole = torch.cat([p.detach() for p in parts])
            rows = parts[0].shape[0]
            for i, (projection, part) in enumerate(zip(projections, parts, strict=True)):
                view = whole[i * rows : (i + 1) * rows]
                setattr(projection, name, torch.nn.Parameter(view, part.requires_grad))
        fused.append(whole.detach())
    return fused[0], fused[1]


def _adjacent_view(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The concatenation of ``parts`` as a view, if they already lie back to back in one storage."""
    first = parts[0]
    step = first.numel() * first.element_size()
    for i, part in enumerate(parts):
        if (
            not part.is_contiguous()
            or part.shape != first.shape
            or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or part.data_ptr() != first.data_ptr() + i * step
        ):
            return None
    shape = (len(parts) * first.shape[0], *first.shape[1:])
    return first.detach().as_strided(shape, first.stride())
