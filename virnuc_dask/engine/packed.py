"""The packed engine: padding-free batches of ESM-2 on a GPU, in bf16 or fp16, streams overlapped.

Batches are packed token streams (:mod:`virnuc_dask.engine.packing`) run through fair-esm's
layers rearranged for them (:mod:`virnuc_dask.engine.layers`); the loop over batches is the
engine base's (:class:`~virnuc_dask.engine.base.Engine`), with one batch kept in flight.
Decisions:

- The host never waits for the device inside a batch. While the device computes batch ``i``,
  the host tokenises batch ``i + 1`` into pinned memory and starts its upload on a copy stream,
  then collects batch ``i - 1``, whose pooled vectors came down on a third stream. Every
  hand-over between streams is ordered by an event, and every tensor used on a stream other
  than the one it was allocated on is marked with ``record_stream``: a race here gives a right
  first batch and garbage after it.
- Only pooled vectors come back to the host, with, when asked, the residues' rows cast on the
  device to the storage dtype (float16 by default: half the bytes of a download in fp32, on
  the same overlapped download stream).
- The windows of a long sequence (``long="window"``) are ordinary packed segments: their
  tokens carry blending weights, the weighted rows come down in fp32 and are blended on the
  host, and a batch without windows multiplies by nothing.
- A batch that runs out of GPU memory is split in half and each half launched again; a single
  sequence that does not fit is an error.
- Layers past the largest one asked for are not run.
- On CUDA the layer runs the fused Triton kernels where Triton is installed (as fast as the
  compiled layer, and it starts in a second); ``torch.compile`` is for engines without them,
  and a worker may compile an engine it already holds (:meth:`PackedEngine.enable_compile`).
  Where the kernels fail to build (Triton's launcher needs a C compiler), the failure is
  logged and the plain torch layer runs, about 25% slower.
- Warm-up batches are sized so that no later batch compiles (see ``_warm_up``).
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from virnuc_dask.engine import torch_dtype
from virnuc_dask.engine.base import BatchOutput, Engine, Run
from virnuc_dask.engine.batching import auto_token_budget
from virnuc_dask.engine.layers import (
    HAS_VARLEN,
    fuse_qkv,
    fused_layer,
    packed_layer,
    prepare_compiled_kernels,
    rotary_tables,
)
from virnuc_dask.engine.packing import pack_batch, segment_mean
from virnuc_dask.model.tokens import MODEL_WINDOW

logger = logging.getLogger(__name__)

#: fair-esm's token-dropout rescaling at inference: with no ``<mask>`` token in the input (our
#: tokenizer never emits one) fair-esm multiplies the embeddings by ``1 - 0.15 * 0.8``.
TOKEN_DROPOUT_SCALE = 1 - 0.15 * 0.8

#: Inductor options on CUDA: tune the block sizes of the fused pointwise and reduction kernels
#: (layer norms, GELU, rotary), which untuned ran at a third to a half of memory bandwidth. The
#: matmuls stay with cuBLAS, which beat every Triton matmul config when autotuned.
CUDA_COMPILE_OPTIONS = {"max_autotune_pointwise": True, "coordinate_descent_tuning": True}

#: A sequence of 250 residues for warm-up batches (the pattern does not matter, the sizes do).
_WARM_UP_SEQUENCE = b"MKTAYIAKQRQISFVKSHFSRQLEE" * 10

#: Token budget on the CPU when none is given (host memory is not measured).
CPU_TOKENS_PER_BATCH = 16384


@dataclass
class _Staged:
    """A batch uploaded (or being uploaded) to the device."""

    run: Run
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


class PackedEngine(Engine):
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
        memory and the model's width
        (see :func:`~virnuc_dask.engine.batching.auto_token_budget`); 16384 on the CPU. A
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
        kernels (:func:`~virnuc_dask.engine.layers.fused_layer`). ``None``: on for CUDA when
        Triton is installed.

    Attributes
    ----------
    compiled
        Whether the layer function is compiled.
    fused
        Whether the layer runs :func:`~virnuc_dask.engine.layers.fused_layer` (Triton
        kernels, not compiled).
    compile_seconds
        Seconds spent compiling and warming up in the constructor (0 when nothing was done).
    oom_splits
        Batches split in half after running out of GPU memory, since construction.
    """

    padded = False
    lookahead = 1

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
        if self._cuda:
            self._upload = torch.cuda.Stream(self.device)
            self._download = torch.cuda.Stream(self.device)
        self.compiled = False
        if fused is None:
            fused = self._cuda and _has_triton()
        if fused and not (self._cuda and _has_triton()):
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
        prepare_compiled_kernels()
        self._layer = torch.compile(packed_layer, dynamic=True, options=options)
        self.compiled = True
        self.fused = False  # the compiler fuses the torch code itself
        seconds = self._warm_up()
        self.compile_seconds += seconds
        return seconds

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

    def _stage(self, run: Run, segs: np.ndarray) -> _Staged:
        """Tokenise a batch of segments into one host buffer and start its upload."""
        packed = pack_batch(run.pieces(segs), self.max_residues)
        # Each segment's mean is divided by its sequence's residues (all its windows).
        divisors = run.divisors(segs).astype(np.int32)
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
        weights = run.weights(segs)
        if weights is not None:
            # Blending weights per token (0 for BOS and EOS): batches holding windows only.
            per_token = np.zeros(len(packed.tokens), dtype=np.float32)
            per_token[packed.segments != len(segs)] = weights
            weights = torch.from_numpy(per_token)
            if self._cuda:
                weights = weights.pin_memory()
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
        return _Staged(run, segs, buffer, tensors, packed.max_len, uploaded, count)

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
            for pending in self._launch(self._stage(staged.run, staged.rows[part]))
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
        storage = torch_dtype(staged.run.residue_dtype) if wanted else None
        pooled: dict[int, torch.Tensor] = {}
        rows: dict[int, torch.Tensor] = {}

        def keep(index: int, x: torch.Tensor) -> None:
            pooled[index] = segment_mean(x, t["segments"], t["residues"], weights)
            if wanted:
                # Cast as soon as taken: one layer's residues in the storage dtype stay alive.
                body = x[t["body"]]
                if weights is None:
                    rows[index] = body.to(storage)
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

    def _collect(self, pending: _Pending) -> BatchOutput:
        """Wait for a batch's download; return its outputs."""
        if pending.downloaded is not None:
            pending.downloaded.synchronize()
        residues = None if pending.residues is None else pending.residues.numpy()
        return BatchOutput(pending.rows, pending.host.numpy(), residues)

    def _on_device(self) -> AbstractContextManager:
        """Make the engine's device current for streams and events (a no-op off CUDA)."""
        return torch.cuda.device(self.device) if self._cuda else nullcontext()


def _has_triton() -> bool:
    """Whether Triton is installed (:data:`virnuc_dask.engine.kernels.HAS_TRITON`).

    Asked only on CUDA: the kernels module imports Triton, which a CUDA engine with the fused
    kernels loads in its warm-up anyway, and which the CPU never needs.
    """
    from virnuc_dask.engine.kernels import HAS_TRITON

    return HAS_TRITON
