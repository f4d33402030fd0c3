"""Two fused GPU kernels for the packed layer, written in Triton: no compiler stack to import.

Run eagerly, the packed layer spends a quarter of its time on memory-bound steps that
``torch.compile`` fuses: the rotary rotation of q and k (a dozen fp32 passes over both in
eager torch) and the residual addition before the feed-forward's layer norm. Compiling fuses
them, but a fresh process then imports torch's compiler stack and loads the compiled layer
before its first batch: 12 s on the GPU machine, paid again by every worker of every job.
These two kernels do the same fusions by hand; Triton compiles each once per machine (its
cache keeps the binaries) and imports in well under a second.

- :func:`rotary_qk` reads q and k from the fused q/k/v projection, rotates them in fp32 with
  each token's position, and writes them in the model's dtype, ready for flash attention.
- :func:`add_layer_norm` adds the attention's output to the residual stream and normalises
  the sum, in one pass over both.

Both compute what the eager torch code computes (same operations in fp32, same roundings to the
model's dtype); the tests compare them with it on the GPU.
"""

from __future__ import annotations

import importlib.util

import torch

#: Whether Triton is installed (it comes with torch's CUDA builds on Linux).
HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    # Token counts change with every batch: not specialised on, so no batch compiles again.
    @triton.jit(do_not_specialize=["rows"])
    def _rotary_kernel(
        qkv,
        table,
        positions,
        q_out,
        k_out,
        rows,
        sin_offset,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        # One row is one (token, head) pair; columns are the first half of the head's
        # features, each paired with the same column of the second half. BLOCK_HALF is the
        # half rounded up to a power of two (ESM-2 35M's heads have 24 features).
        half: tl.constexpr = HEAD_DIM // 2
        dim: tl.constexpr = HEADS * HEAD_DIM
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        inside = row < rows
        token = (row // HEADS).to(tl.int64)
        head = row % HEADS
        col = tl.arange(0, BLOCK_HALF)
        mask = inside[:, None] & (col < half)[None, :]
        position = tl.load(positions + token, mask=inside, other=0).to(tl.int64)
        angle = position[:, None] * HEAD_DIM + col[None, :]
        cos = tl.load(table + angle, mask=mask, other=0.0)
        sin = tl.load(table + sin_offset + angle, mask=mask, other=0.0)
        source = (token * (3 * dim) + head * HEAD_DIM)[:, None] + col[None, :]
        target = row.to(tl.int64)[:, None] * HEAD_DIM + col[None, :]
        # fair-esm: x * cos + rotate_half(x) * sin, where rotate_half(x) = (-second, first).
        q1 = tl.load(qkv + source, mask=mask, other=0.0).to(tl.float32)
        q2 = tl.load(qkv + source + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_out + target, (q1 * cos - q2 * sin).to(q_out.dtype.element_ty), mask=mask)
        tl.store(q_out + target + half, (q2 * cos + q1 * sin).to(q_out.dtype.element_ty), mask=mask)
        k1 = tl.load(qkv + source + dim, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(qkv + source + dim + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(k_out + target, (k1 * cos - k2 * sin).to(k_out.dtype.element_ty), mask=mask)
        tl.store(k_out + target + half, (k2 * cos + k1 * sin).to(k_out.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_layer_norm_kernel(
        x,
        delta,
        weight,
        bias,
        total,
        normed,
        eps,
        DIM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per token: the sum is rounded to the stream's dtype (as eager torch
        # stores it), then normalised in fp32 (as torch's layer norm computes).
        start = tl.program_id(0).to(tl.int64) * DIM
        col = tl.arange(0, BLOCK)
        mask = col < DIM
        a = tl.load(x + start + col, mask=mask, other=0.0)
        b = tl.load(delta + start + col, mask=mask, other=0.0)
        added = (a.to(tl.float32) + b.to(tl.float32)).to(total.dtype.element_ty)
        tl.store(total + start + col, added, mask=mask)
        value = added.to(tl.float32)
        mean = tl.sum(value, axis=0) / DIM
        centred = tl.where(mask, value - mean, 0.0)
        variance = tl.sum(centred * centred, axis=0) / DIM
        scale = 1.0 / tl.sqrt(variance + eps)
        w = tl.load(weight + col, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(bias + col, mask=mask, other=0.0).to(tl.float32)
        result = (centred * scale * w + c).to(normed.dtype.element_ty)
        tl.store(normed + start + col, result, mask=mask)


#: (token, head) rows one rotary program handles.
ROTARY_ROWS = 64


def rotary_qk(
    qkv: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k of a packed batch; return them as ``(tokens, heads, head_dim)`` each.

    Parameters
    ----------
    qkv
        The fused projection's output, ``(tokens, 3 * dim)``, contiguous: q, then k, then v.
    table
        fp32 ``cos`` and ``sin`` stacked, ``(2, positions, head_dim)``, halves repeated (as
        :func:`~virnuc_dask.engine.layers.rotary_tables` builds it), contiguous.
    positions
        Each token's position in its sequence (int32).
    heads
        Attention heads.
    """
    tokens, width = qkv.shape
    head_dim = width // (3 * heads)
    if not (qkv.is_contiguous() and table.is_contiguous()):
        raise ValueError("rotary_qk needs contiguous qkv and table")
    q = torch.empty((tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty_like(q)
    rows = tokens * heads
    if rows:
        _rotary_kernel[(triton.cdiv(rows, ROTARY_ROWS),)](
            qkv,
            table,
            positions,
            q,
            k,
            rows,
            table.shape[1] * head_dim,
            HEADS=heads,
            HEAD_DIM=head_dim,
            BLOCK_ROWS=ROTARY_ROWS,
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        )
    return q, k


def add_layer_norm(
    x: torch.Tensor, delta: torch.Tensor, norm: torch.nn.LayerNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``x + delta`` and ``norm(x + delta)``, both ``(tokens, dim)``, in one pass.

    ``norm`` is a ``torch.nn.LayerNorm`` over the last dimension, with weight and bias.
    """
    tokens, dim = x.shape
    if not (x.is_contiguous() and delta.is_contiguous()):
        raise ValueError("add_layer_norm needs contiguous inputs")
    total = torch.empty_like(x)
    normed = torch.empty_like(x)
    if tokens:
        block = triton.next_power_of_2(dim)
        _add_layer_norm_kernel[(tokens,)](
            x,
            delta,
            norm.weight,
            norm.bias,
            total,
            normed,
            norm.eps,
            DIM=dim,
            BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
        )
    return total, normed
