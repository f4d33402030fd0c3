"""Engines: turn a list of sequences into pooled embeddings on one device.

Two engines share one interface (``embed(list[bytes]) -> float32 array``) and one loop over
batches, the engine base's:

- :class:`~virnuc_dask.engine.reference.ReferenceEngine`: fair-esm's own forward on padded
  batches, in fp32; the CPU path and the yardstick of every fidelity test.
- :class:`~virnuc_dask.engine.packed.PackedEngine`: padding-free packed batches with varlen
  attention, bf16 or fp16, overlapped CUDA streams; the GPU path.

The modules, in the order a batch meets them:

- :mod:`~virnuc_dask.engine.base`: the engine base, :class:`~virnuc_dask.engine.base.Engine`:
  segments, length sort, batches, blending and progress, once for both engines.
- :mod:`~virnuc_dask.engine.blend`: the windows of long sequences as segments, and their
  outputs blended back into one per sequence.
- :mod:`~virnuc_dask.engine.batching`: token-budget batches, and the budget chosen from free
  device memory.
- :mod:`~virnuc_dask.engine.reference`: the reference engine.
- :mod:`~virnuc_dask.engine.packing`: a packed batch (sequences back to back in one token
  stream) and the mean over each of its sequences.
- :mod:`~virnuc_dask.engine.layers`: fair-esm's transformer layer on a packed stream (rotary,
  varlen attention, the fused q/k/v projection).
- :mod:`~virnuc_dask.engine.kernels`: two Triton kernels for that layer's memory-bound steps.
- :mod:`~virnuc_dask.engine.packed`: the packed engine (streams, staging, warm-up, compile).

This module builds the right engine for a device and precision (:func:`build_engine`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virnuc_dask.model.tokens import MODEL_WINDOW

if TYPE_CHECKING:
    import torch

#: Bumped whenever a change of the engines changes the numbers they produce: part of every
#: run's fingerprint, so shards of an older engine are never reused by a newer one.
ENGINE_VERSION = 1


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a compute precision or of a storage dtype.

    Parameters
    ----------
    name
        A compute precision (``fp32``, ``bf16``, ``fp16``: the ``dtype`` setting) or a storage
        dtype (``float32``, ``float16``, ``bfloat16``, or numpy's other spellings of the first
        two: the ``residue_dtype`` setting).
    """
    import numpy as np
    import torch

    names = {
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,  # not a numpy dtype: named here
    }
    if isinstance(name, str) and name in names:
        return names[name]
    return {"float16": torch.float16, "float32": torch.float32}[str(np.dtype(name))]


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """Resolve ``auto`` to ``bf16`` on a GPU and ``fp32`` elsewhere."""
    if dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return dtype


def build_engine(
    model: torch.nn.Module,
    *,
    device: torch.device,
    dtype: str,
    layers: list[int],
    max_residues: int = MODEL_WINDOW,
    tokens_per_batch: int | None = None,
    compile: bool | None = None,
):
    """Move ``model`` to ``device`` in the compute precision and wrap it in the right engine.

    fp32 runs the reference engine; bf16 and fp16 run the packed engine. The model is cast in
    place: there is never a second copy of its weights on the device.
    """
    dtype = resolve_dtype(dtype, device)
    model = model.to(device=device, dtype=torch_dtype(dtype)).eval()
    if dtype == "fp32":
        from virnuc_dask.engine.reference import ReferenceEngine

        return ReferenceEngine(
            model,
            layers=layers,
            max_residues=max_residues,
            tokens_per_batch=tokens_per_batch or 16384,
        )
    from virnuc_dask.engine.packed import PackedEngine

    return PackedEngine(
        model,
        layers=layers,
        max_residues=max_residues,
        tokens_per_batch=tokens_per_batch,
        dtype=torch_dtype(dtype),
        compile=compile,
    )
