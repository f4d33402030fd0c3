"""The packed engine: padding-free batches of ESM-2 on a GPU, in bf16 or fp16.

A batch's sequences are concatenated into one token stream described by ``cu_seqlens`` (the
offsets where each sequence starts), so no compute is spent on padding: on viral peptides of
60-170 residues a padded batch wastes up to a third of its tokens, and on proteomes more. The
layers are fair-esm's own modules and weights, called in a different arrangement:

- attention runs over the packed stream with varlen (flash) attention, one segment per sequence;
  on the CPU, and for fp32, a loop of ``scaled_dot_product_attention`` over the segments stands in,
  so the packing logic is testable anywhere;
- rotary positions restart at every sequence and are computed in fp32 (fair-esm computes them in
  the model's dtype, and bf16 rounds positions above 256);
- q, k and v come from one matmul whose weight is a single tensor; fair-esm's ``q_proj``,
  ``k_proj`` and ``v_proj`` parameters become views into it, so the weights exist once;
- q is scaled by ``head_dim ** -0.5`` through the attention's softmax scale, which is the same
  product as fair-esm's scaling of q before the rotation (the rotation is linear);
- pooling (mean over residues, BOS and EOS excluded) happens on the GPU in fp32, and only pooled
  vectors come back to the host, with, when asked, the residues' rows cast on the device to the
  storage dtype (float16 by default: half the bytes of a download in fp32, on the same
  overlapped download stream);
- the windows of a long sequence (``long="window"``) are ordinary packed segments: their tokens
  carry blending weights, the weighted rows come down in fp32 and are blended on the host, and
  a batch without windows multiplies by nothing.

The host never waits for the device inside a batch. While the device computes batch ``i``, the
host tokenises batch ``i + 1`` into pinned memory and starts its upload on a copy stream, then
collects batch ``i - 1``, whose pooled vectors came down on a third stream. Every hand-over
between streams is ordered by an event, and every tensor used on a stream other than the one it
was allocated on is marked with ``record_stream``: a race here gives a right first batch and
garbage after it.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from virnuc_dask.engine.batching import token_budget_batches
from virnuc_dask.engine.blend import Blender, Segments, plan_segments
from virnuc_dask.model.tokens import MODEL_WINDOW, packed_tokens

# torch >= 2.10 has varlen flash attention; without it the GPU path is unavailable and the
# CPU fallback still works. Found, not imported: see _prepare_compiled_kernels.
HAS_VARLEN = importlib.util.find_spec("torch.nn.attention.varlen") is not None
#: Whether Triton is installed, for the fused eager layer (:mod:`virnuc_dask.engine.kernels`).
HAS_TRITON = importlib.util.find_spec("triton") is not None
# torch's varlen_attn custom op, set when an engine first compiles (see below).
_varlen_attn = None
_compiled_kernels_ready = False

logger = logging.getLogger(__name__)

#: fair-esm's token-dropout rescaling at inference: with no ``<mask>`` token in the input (our
#: tokenizer never emits one) fair-esm multiplies the embeddings by ``1 - 0.15 * 0.8``.
TOKEN_DROPOUT_SCALE = 1 - 0.15 * 0.8

#: Bounds of the token budget chosen from free device memory: below 8k tokens the matmuls stop
#: filling the device; above 64k nothing is gained (on an H200, ESM-2 3B ran 1% faster with 64k
#: than with 128k) and an OOM split costs more.
MIN_AUTO_TOKENS, MAX_AUTO_TOKENS = 8192, 65536

#: Inductor options on CUDA: tune the block sizes of the fused pointwise and reduction kernels
#: (layer norms, GELU, rotary), which untuned ran at a third to a half of memory bandwidth. The
#: matmuls stay with cuBLAS, which beat every Triton matmul config when autotuned.
CUDA_COMPILE_OPTIONS = {"max_autotune_pointwise": True, "coordinate_descent_tuning": True}

#: A sequence of 250 residues for warm-up batches (the pattern does not matter, the sizes do).
_WARM_UP_SEQUENCE = b"MKTAYIAKQRQISFVKSHFSRQLEE" * 10

#: Token budget on the CPU when none is given (host memory is not measured).
CPU_TOKENS_PER_BATCH = 16384


@dataclass
class PackedBatch:
    """One batch tokenised into a packed stream, as host arrays (int32).

    Attributes
    ----------
    tokens
        Token ids of all sequences back to back, ``<cls> residues <eos>`` each.
    positions
        Position of each token within its own sequence (0 at its BOS).
    segments
        Row of the pooled output each token adds to: its sequence for a residue, one row past
        the last sequence for BOS and EOS (that row is dropped).
    cu_seqlens
        Offsets where each sequence starts, and the total at the end.
    residues
        Residues per sequence after truncation.
    max_len
        Tokens of the longest sequence.
    """

    tokens: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    cu_seqlens: np.ndarray
    residues: np.ndarray
    max_len: int

    def arrays(self) -> list[np.ndarray]:
        """The arrays in the order they travel to the device in one buffer."""
        return [self.tokens, self.positions, self.segments, self.cu_seqlens, self.residues]


def pack_batch(sequences: list[bytes], max_residues: int = MODEL_WINDOW) -> PackedBatch:
    """Tokenise sequences into one packed stream with per-token positions and segments.

    Parameters
    ----------
    sequences
        Validated sequences as bytes.
    max_residues
        Residues kept per sequence.

    Returns
    -------
    PackedBatch
    """
    tokens, cu_seqlens = packed_tokens(sequences, max_residues)
    count = len(sequences)
    lengths = np.diff(cu_seqlens)
    starts = np.repeat(cu_seqlens[:-1], lengths)
    positions = np.arange(len(tokens), dtype=np.int32) - starts
    segments = np.repeat(np.arange(count, dtype=np.int32), lengths)
    segments[cu_seqlens[:-1]] = count
    segments[cu_seqlens[1:] - 1] = count
    return PackedBatch(
        tokens=tokens.astype(np.int32),
        positions=positions.astype(np.int32),
        segments=segments,
        cu_seqlens=cu_seqlens,
        residues=(lengths - 2).astype(np.int32),
        max_len=int(lengths.max(initial=0)),
    )


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


def _prepare_compiled_kernels() -> None:
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


def segment_mean(
    x: torch.Tensor,
    segments: torch.Tensor,
    residues: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the rows of ``x`` per segment, in fp32; segment ``len(residues)`` is dropped.

    Parameters
    ----------
    x
        Packed hidden states ``(tokens, dim)``.
    segments
        Output row of each token (BOS and EOS point one past the last row).
    residues
        The divisor of each row: residues of its sequence (of all its windows).
    weights
        Blending weight of each token (windows of long sequences); None: all 1, and nothing
        is multiplied, so a batch without windows computes exactly what it always did.
    """
    sums = torch.zeros(len(residues) + 1, x.shape[1], dtype=torch.float32, device=x.device)
    rows = x.float() if weights is None else x.float() * weights[:, None]
    sums.index_add_(0, segments, rows)
    return sums[:-1] / residues[:, None].float()


def auto_token_budget(free_bytes: int, embed_dim: int, element_size: int) -> int:
    """Choose a packed batch's token budget from free device memory.

    A layer keeps about ten ``dim``-wide activations per token alive at its peak (the residual,
    the feed-forward's 4x-wide input and output, the fp32 copy pooled); sixteen leaves room for
    the next batch's upload and the allocator's fragmentation. Half the free memory is used.

    Returns
    -------
    int
        A multiple of 1024 between :data:`MIN_AUTO_TOKENS` and :data:`MAX_AUTO_TOKENS`.
    """
    per_token = 16 * embed_dim * element_size
    budget = int(free_bytes * 0.5 // per_token) // 1024 * 1024
    return int(np.clip(budget, MIN_AUTO_TOKENS, MAX_AUTO_TOKENS))


@dataclass
class _Staged:
    """A batch uploaded (or being uploaded) to the device."""

    rows: np.ndarray
    buffer: torch.Tensor
    tensors: dict[str, torch.Tensor]
    max_len: int
    uploaded: torch.cuda.Event | None
    residue_tokens: int = 0


@dataclass
class _Pending:
    """A batch's pooled vectors on their way to the host."""

    rows: np.ndarray
    host: torch.Tensor
    downloaded: torch.cuda.Event | None
    residues: torch.Tensor | None = None


class PackedEngine:
    """Embed sequences with fair-esm's ESM-2 weights on padding-free packed batches.

    Same interface and semantics as
    :class:`~virnuc_dask.engine.reference.ReferenceEngine`; built for GPUs (bf16 by default,
    varlen flash attention, overlapped CUDA streams), and runnable on the CPU for tests.

    Parameters
    ----------
    model
        A fair-esm ``ESM2`` module on its device, in eval mode. It is cast to ``dtype`` in
        place, and the q, k and v projections of each layer are moved into one storage (their
        parameters become views of it): the weights are never copied.
    layers
        Layers to pool, numbered as fair-esm numbers them (0 is the embedding, ``num_layers``
        the final layer, taken after the final layer norm). Layers past the largest one asked
        for are not run.
    max_residues
        Residues kept per sequence (the model's window is 1022).
    tokens_per_batch
        Tokens (residues + 2 per sequence) in one packed batch. ``None``: chosen from free GPU
        memory and the model's width (see :func:`auto_token_budget`); 16384 on the CPU. A
        batch that runs out of GPU memory is split in half and retried.
    dtype
        Compute precision: ``torch.bfloat16`` (default) or ``torch.float16`` on a GPU;
        ``torch.float32`` runs too (attention then loops over sequences), for tests.
    compile
        Compile the layer function with ``torch.compile`` (dynamic token counts). ``None``: on
        for CUDA when the fused kernels are off (no Triton), off for the CPU. Compiling and
        warming up happen in the constructor and take :attr:`compile_seconds`.
    fused
        When not compiled, run the layer's rotary and residual-plus-norm steps in Triton
        kernels (:func:`fused_layer`). ``None``: on for CUDA when Triton is installed.

    Attributes
    ----------
    compiled
        Whether the layer function is compiled.
    fused
        Whether the layer runs :func:`fused_layer` (Triton kernels, not compiled).
    compile_seconds
        Seconds spent compiling and warming up in the constructor (0 when nothing was done).
    oom_splits
        Batches split in half after running out of GPU memory, since construction.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        layers: list[int],
        max_residues: int = MODEL_WINDOW,
        tokens_per_batch: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        compile: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        self.layers = list(layers)
        if not self.layers or not all(0 <= n <= model.num_layers for n in self.layers):
            raise ValueError(f"layers must lie in 0..{model.num_layers}, got {self.layers}")
        self.model = model.to(dtype).eval()
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self.max_residues = max_residues
        self._cuda = self.device.type == "cuda"
        if self._cuda and not HAS_VARLEN:
            raise RuntimeError("the packed engine needs torch >= 2.10 on CUDA (varlen attention)")
        self._depth = max(self.layers)
        self._qkv = [fuse_qkv(layer.self_attn) for layer in model.layers[: self._depth]]
        self._rotary = rotary_tables(
            model.embed_dim // model.attention_heads, max_residues + 2, self.device
        )
        self.tokens_per_batch = tokens_per_batch or self._auto_budget()
        self.oom_splits = 0
        self._run: _Run | None = None
        if self._cuda:
            self._upload = torch.cuda.Stream(self.device)
            self._download = torch.cuda.Stream(self.device)
        self.compiled = False
        if fused is None:
            fused = self._cuda and HAS_TRITON
        if fused and not (self._cuda and HAS_TRITON):
            raise RuntimeError("fused kernels need CUDA and Triton")
        self.fused = bool(fused)
        self._kernels_failed = False
        self._layer = fused_layer if self.fused else packed_layer
        self.compile_seconds = 0.0
        if compile is None:
            compile = self.compiles_by_default
        if compile:
            self.enable_compile()
        elif self._cuda:
            self.compile_seconds = self._first_warm_up()

    @property
    def compiles_by_default(self) -> bool:
        """Whether ``compile=None`` compiles this engine: on CUDA, only without fused kernels.

        The fused kernels run as fast as the compiled layer (``benchmarks/layer_paths.py``)
        and start in a second, where compiling first imports torch's compiler stack.
        """
        # Where the fused kernels failed to build, compiling (Triton again) would fail too.
        return self._cuda and not self.fused and not self.compiled and not self._kernels_failed

    def enable_compile(self) -> float:
        """Compile the layer function (if it is not yet) and warm it up; return the seconds.

        A worker keeps one engine across runs: a small job builds it eager (compiling would
        cost more than it saves), and a later large job on the same worker compiles it here
        instead of loading the model again.
        """
        if self.compiled:
            return 0.0
        options = CUDA_COMPILE_OPTIONS if self._cuda else None
        _prepare_compiled_kernels()
        self._layer = torch.compile(packed_layer, dynamic=True, options=options)
        self.compiled = True
        self.fused = False  # the compiler fuses the torch code itself
        seconds = self._warm_up()
        self.compile_seconds += seconds
        return seconds

    def embed(
        self,
        sequences: list[bytes],
        on_batch: Callable[[int], None] | None = None,
        *,
        long: str = "truncate",
        on_residues: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
        residue_dtype: str = "float16",
    ) -> np.ndarray:
        """Return mean embeddings, float32 of shape ``(len(sequences), len(layers), dim)``.

        Rows are in the order of ``sequences``; batches run longest first. ``on_batch`` is
        called with the tokens (residues + 2 per window) of each batch once its vectors are
        on the host. ``long``, ``on_residues`` and ``residue_dtype`` as in
        :meth:`~virnuc_dask.engine.reference.ReferenceEngine.embed`: the windows of a long
        sequence are ordinary packed segments; per-residue rows come down in
        ``residue_dtype`` (float32 for the weighted rows of windowed sequences, blended on
        the host).
        """
        out = np.zeros((len(sequences), len(self.layers), self.model.embed_dim), np.float32)
        if not sequences:
            return out
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        plan = plan_segments(lengths, self.max_residues, long)
        self._run = _Run(sequences, plan, on_residues is not None, torch_dtype_of(residue_dtype))
        blender = Blender(plan, out, on_residues, residue_dtype)
        sizes = plan.lengths
        order = np.argsort(-sizes, kind="stable")
        cuts = token_budget_batches(sizes[order] + 2, self.tokens_per_batch, padded=False)
        batches = [order[cut] for cut in cuts]
        in_flight: deque[_Pending] = deque()
        try:
            with torch.inference_mode(), _on_device(self.device):
                staged = self._stage(batches[0])
                for upcoming in [*batches[1:], None]:
                    in_flight.extend(self._launch(staged))
                    # The device now has this batch queued: tokenise and upload the next one
                    # meanwhile, then collect the batch before this one.
                    if upcoming is not None:
                        staged = self._stage(upcoming)
                    while len(in_flight) > 1:
                        self._collect(in_flight.popleft(), blender, sizes, on_batch)
                while in_flight:
                    self._collect(in_flight.popleft(), blender, sizes, on_batch)
        finally:
            self._run = None
        return out

    def _auto_budget(self) -> int:
        if not self._cuda:
            return CPU_TOKENS_PER_BATCH
        free, _ = torch.cuda.mem_get_info(self.device)
        return auto_token_budget(free, self.model.embed_dim, self.dtype.itemsize)

    def _first_warm_up(self) -> float:
        """Warm an eager engine up; if the fused kernels fail to build, use plain torch.

        Triton compiles its kernels (and a small C launcher, which needs a C compiler) the
        first time they run. Where that fails, the engine still works, about 25% slower:
        the failure is logged, not raised.
        """
        try:
            return self._warm_up(full=False)
        except Exception as error:
            if not self.fused:
                raise
            logger.warning(
                "the fused GPU kernels could not run here (%s: %s); the layer runs in plain "
                "torch instead, about 25%% slower",
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
            self.fused = False
            self._kernels_failed = True
            self._layer = packed_layer
            return self._warm_up(full=False)

    def _warm_up(self, full: bool = True) -> float:
        """Compile on a full batch, then run a small one, so that no later batch compiles.

        The first batch's sizes are the compiler's hints and the kernel tuner's test case, so
        it holds a full budget of tokens. Counts and lengths are chosen so that no two dynamic
        sizes coincide (the compiler would assume they always do) and no batch holds a single
        sequence (it would specialise on that). An eager engine (``full=False``) only runs the
        small batch, which loads the kernels and the cuBLAS handles; a full one would cost a
        small job seconds for nothing.
        """
        start = time.perf_counter()
        if full:
            count = max(3, self.tokens_per_batch // (len(_WARM_UP_SEQUENCE) + 2))
            self.embed([_WARM_UP_SEQUENCE] * count)
        self.embed([b"W" * 130, b"G" * 40])
        if self._cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _stage(self, segs: np.ndarray) -> _Staged:
        """Tokenise a batch of segments into one host buffer and start its upload."""
        run = self._run
        plan = run.plan
        pieces = [run.sequences[q][a:b] for q, a, b in plan.pieces(segs)]
        packed = pack_batch(pieces, self.max_residues)
        # Each segment's mean is divided by its sequence's residues (all its windows).
        divisors = plan.residues[plan.sequence[segs]].astype(np.int32)
        arrays = [packed.tokens, packed.positions, packed.segments, packed.cu_seqlens, divisors]
        names = ["tokens", "positions", "segments", "cu_seqlens", "residues"]
        body = None
        if run.residues:
            body = np.flatnonzero(packed.segments != len(segs)).astype(np.int32)
            arrays.append(body)
            names.append("body")
        sizes = [len(a) for a in arrays]
        host = torch.empty(sum(sizes), dtype=torch.int32, pin_memory=self._cuda)
        np.concatenate(arrays, out=host.numpy())
        weights = None
        if plan.blended(segs).any():
            # Blending weights per token (0 for BOS and EOS): batches holding windows only.
            weights = np.zeros(len(packed.tokens), dtype=np.float32)
            weights[packed.segments != len(segs)] = plan.weights(segs)
            weights = (
                torch.from_numpy(weights).pin_memory() if self._cuda else torch.from_numpy(weights)
            )
        uploaded = None
        if self._cuda:
            with torch.cuda.stream(self._upload):
                buffer = host.to(self.device, non_blocking=True)
                if weights is not None:
                    weights = weights.to(self.device, non_blocking=True)
                uploaded = torch.cuda.Event()
                uploaded.record()
        else:
            buffer = host
        tensors = dict(zip(names, buffer.split(sizes), strict=True))
        if weights is not None:
            tensors["weights"] = weights
        count = 0 if body is None else len(body)
        return _Staged(segs, buffer, tensors, packed.max_len, uploaded, count)

    def _launch(self, staged: _Staged) -> list[_Pending]:
        """Queue a batch's forward and the download of its pooled vectors.

        A batch that runs out of GPU memory is split in half and each half launched again.
        """
        if staged.uploaded is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(staged.uploaded)
            staged.buffer.record_stream(compute)
            if "weights" in staged.tensors:
                staged.tensors["weights"].record_stream(compute)
        try:
            return [self._send_back(*self._forward(staged), staged.rows)]
        except torch.OutOfMemoryError:
            if len(staged.rows) == 1:
                raise
        # Out of the except block: the failed attempt's traceback, which holds its tensors, is gone.
        self.oom_splits += 1
        half = len(staged.rows) // 2
        logger.warning(
            "out of GPU memory on a batch of %d sequences; splitting it in two (budget %d tokens)",
            len(staged.rows),
            self.tokens_per_batch,
        )
        return [
            pending
            for part in (slice(None, half), slice(half, None))
            for pending in self._launch(self._stage(staged.rows[part]))
        ]

    def _forward(self, staged: _Staged) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model on one packed batch.

        Returns the pooled fp32 ``(count, len(layers), dim)`` and, when per-residue values are
        asked for, the residues' rows ``(residues, len(layers), dim)``: in the storage dtype,
        or weighted fp32 in a batch that holds windows of long sequences.
        """
        t = staged.tensors
        model = self.model
        weights = t.get("weights")
        wanted = "body" in t
        x = model.embed_tokens(t["tokens"])
        if model.token_dropout:
            x = x * TOKEN_DROPOUT_SCALE
        # The fused layer reads the table by position; the others take it gathered per token.
        table = self._rotary
        rotary = (table, t["positions"]) if self.fused else table[:, t["positions"]]
        pooled: dict[int, torch.Tensor] = {}
        rows: dict[int, torch.Tensor] = {}

        def keep(index: int, x: torch.Tensor) -> None:
            pooled[index] = segment_mean(x, t["segments"], t["residues"], weights)
            if wanted:
                # Cast as soon as taken: one layer's residues in the storage dtype stay alive.
                body = x[t["body"]]
                if weights is None:
                    rows[index] = body.to(self._run.residue_dtype)
                else:
                    rows[index] = body.float() * weights[t["body"]][:, None]

        if 0 in self.layers:
            keep(0, x)
        for index, (layer, (weight, bias)) in enumerate(
            zip(model.layers[: self._depth], self._qkv, strict=True), start=1
        ):
            x = self._layer(x, layer, weight, bias, rotary, t["cu_seqlens"], staged.max_len)
            if index == model.num_layers:
                x = model.emb_layer_norm_after(x)
            if index in self.layers:
                keep(index, x)
        stacked = torch.stack([pooled[n] for n in self.layers], dim=1)
        if not wanted:
            return stacked, None
        return stacked, torch.stack([rows[n] for n in self.layers], dim=1)

    def _send_back(
        self, pooled: torch.Tensor, residues: torch.Tensor | None, rows: np.ndarray
    ) -> _Pending:
        """Start copying pooled vectors (and residues) into pinned host memory."""
        if not self._cuda:
            return _Pending(rows, pooled, None, residues)
        computed = torch.cuda.Event()
        computed.record()
        host = torch.empty(pooled.shape, dtype=pooled.dtype, pin_memory=True)
        host_residues = None
        if residues is not None:
            host_residues = torch.empty(residues.shape, dtype=residues.dtype, pin_memory=True)
        with torch.cuda.stream(self._download):
            self._download.wait_event(computed)
            host.copy_(pooled, non_blocking=True)
            pooled.record_stream(self._download)
            if residues is not None:
                host_residues.copy_(residues, non_blocking=True)
                residues.record_stream(self._download)
            downloaded = torch.cuda.Event()
            downloaded.record()
        return _Pending(rows, host, downloaded, host_residues)

    @staticmethod
    def _collect(pending: _Pending, blender: Blender, sizes: np.ndarray, on_batch) -> None:
        if pending.downloaded is not None:
            pending.downloaded.synchronize()
        residues = None if pending.residues is None else pending.residues.numpy()
        blender.add(pending.rows, pending.host.numpy(), residues)
        if on_batch is not None:
            on_batch(int(sizes[pending.rows].sum()) + 2 * len(pending.rows))


@dataclass
class _Run:
    """One :meth:`PackedEngine.embed` call's inputs, read by its batches."""

    sequences: list[bytes]
    plan: Segments
    residues: bool
    residue_dtype: torch.dtype


def torch_dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a numpy dtype name (``float16``, ``float32``)."""
    return {"float16": torch.float16, "float32": torch.float32}[str(np.dtype(name))]


def _on_device(device: torch.device):
    """Make ``device`` current for streams and events (a no-op off CUDA)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()
