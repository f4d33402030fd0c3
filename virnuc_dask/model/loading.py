"""Building the ESM-2 module of a weights source on a device, fast.

Decisions:

- A checkpoint's model is built without initialising its weights and its tensors assigned
  from the mapped file, renamed as fair-esm renames them, instead of fair-esm's ``ESM2(...)``
  on the CPU, which randomly initialises every weight first (25 s for 3B) only to overwrite
  it. Floating tensors cross to a GPU in the file's dtype and are cast there. The result is
  bitwise the model fair-esm's ``load_model_and_alphabet_core`` builds: floating tensors in
  fp32 (or the asked dtype), the tied embedding/LM-head weight tied again, the rotary
  frequencies recomputed if the file lacks them. The model owns its memory: a file rewritten
  in place during a run must not change (or crash) a worker's model through the mapping.
- Random weights keep the plain CPU construction, seeded: bit-identical on every worker.
- torch and fair-esm are imported inside the functions that use them.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from virnuc_dask.errors import VirnucError
from virnuc_dask.model.checkpoint import _REGRESSION_KEYS, _checked_state
from virnuc_dask.model.registry import ModelSpec, model_spec
from virnuc_dask.model.weights import WeightsSource, checkpoint_digest

if TYPE_CHECKING:
    import torch


def _esm2(spec: ModelSpec, token_dropout: bool) -> torch.nn.Module:
    import esm

    return esm.ESM2(
        num_layers=spec.num_layers,
        embed_dim=spec.embed_dim,
        attention_heads=spec.attention_heads,
        alphabet="ESM-1b",
        token_dropout=token_dropout,
    )


# The weight initialisers module constructors call (nn.Linear, nn.Embedding, nn.LayerNorm and
# fair-esm's attention call these through ``torch.nn.init``).
_INITIALISERS = (
    "normal_",
    "uniform_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "trunc_normal_",
    "zeros_",
    "ones_",
    "constant_",
)


@contextlib.contextmanager
def _no_initialisation():
    """Skip weight initialisation while a model is built only to receive a checkpoint.

    Random values drawn for weights that are replaced at once cost 25 s for 3B on a CPU.
    The initialisers are swapped process-wide for the duration: model loading is the only
    thing a worker's engine lock lets run then.
    """
    import torch

    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(torch.nn.init, name, _unchanged)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _unchanged(tensor, *args, **kwargs):
    return tensor


def load_model(
    source: WeightsSource,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Build the ESM-2 module of ``source`` in eval mode.

    Random weights are drawn on the CPU from a private generator seeded with ``source.seed``,
    so every worker process builds bit-identical weights whatever device it will run on.
    A checkpoint's module is built uninitialised and its tensors assigned straight from
    the memory-mapped file, cast to ``dtype`` and placed on ``device`` tensor by tensor, so no
    full fp32 copy is made on the CPU on the way to a GPU.

    Parameters
    ----------
    source
        The weights, from :func:`resolve_weights`.
    device
        Where the weights go; default: the CPU.
    dtype
        Floating-point dtype of the weights; default: fp32, as fair-esm builds them.

    Raises
    ------
    VirnucError
        The checkpoint changed since :func:`resolve_weights` recorded its digest, or is
        unreadable or of another model.
    """
    import torch

    spec = model_spec(source.model)
    if source.is_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.seed)
            model = _esm2(spec, token_dropout=True)
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        return model.eval()

    path = Path(source.checkpoint)
    if not path.is_file():
        raise VirnucError(
            f"checkpoint {path} is not there on this worker; give every worker the same file "
            "(a shared file system) or put it in each worker's torch hub cache"
        )
    if source.sha256 is not None and checkpoint_digest(path) != source.sha256:
        raise VirnucError(
            f"checkpoint {path} changed since the run started (its sha256 is no longer "
            f"{source.sha256}); restore the file, or start the run again to use the new one"
        )
    state, cfg = _checked_state(path, spec)
    return _assign(spec, state, cfg, device=torch.device(device or "cpu"), dtype=dtype)


def _assign(
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    cfg: argparse.Namespace,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
) -> torch.nn.Module:
    """Build ESM2 without initialising it and give it the checkpoint's tensors."""
    import torch
    from esm.rotary_embedding import RotaryEmbedding

    # Built on the CPU with its initialisers skipped: the parameters' memory is allocated but
    # never touched (so never committed), and replaced below. The meta device would need no
    # memory at all, but its first Python-implemented operation (fair-esm's rotary frequencies)
    # imports torch's compiler stack, seconds in every fresh worker.
    with torch.device("cpu"), _no_initialisation():
        model = _esm2(spec, token_dropout=cfg.token_dropout)
    # load_state_dict(assign=True) would take each tensor's dtype from the file; fair-esm
    # copies into fp32 parameters, so floating tensors become fp32 unless asked otherwise.
    # to_device copies: the model must not alias the memory-mapped file.
    target = dtype or torch.float32
    tensors = {name: to_device(t, device, target) for name, t in state.items()}
    # Tied parameters (the LM head shares the token embedding) are separate objects after an
    # assigning load; fair-esm's copying load leaves the value of the last name loaded.
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    # strict=False: the contact head's weights may be absent (no regression file), and so
    # may the rotary frequencies; both are made below, and nothing else can be missing.
    missing = set(model.load_state_dict(tensors, strict=False, assign=True).missing_keys)
    order = list(model.state_dict())
    for names in tied.values():
        if len(names) > 1:
            last = max(names, key=order.index)
            shared = model.get_parameter(last)
            for name in names:
                _set(model, name, shared)

    for prefix, module in model.named_modules():
        name = f"{prefix}.inv_freq"
        if isinstance(module, RotaryEmbedding) and name in missing:
            # Not in the file: fair-esm's formula, computed in fp32 on the CPU as it does.
            dim = 2 * module.inv_freq.shape[0]
            inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
            module.inv_freq = inv_freq.to(device=device, dtype=target)
            missing.discard(name)
    for name in _REGRESSION_KEYS:
        if name in missing:
            # Without the regression file fair-esm leaves a random contact head ("contacts
            # will not be correct"); zeros say the same without drawing random numbers.
            shape = model.get_parameter(name).shape
            _set(model, name, torch.nn.Parameter(torch.zeros(shape, device=device, dtype=target)))
            missing.discard(name)
    if missing:
        raise RuntimeError(f"tensors not in the checkpoint: {sorted(missing)}")
    return model.eval()


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A copy of a (memory-mapped) checkpoint tensor on ``device``, floats cast to ``dtype``.

    The bytes cross to a GPU in the file's dtype and are cast there. ``tensor.to(device,
    dtype)`` would cast on the CPU first (torch converts on the source side of a host-to-device
    copy), single-threaded in a Dask worker (``OMP_NUM_THREADS=1``): seconds for a 3B model.
    The result never aliases the file.
    """
    wanted = dtype if tensor.is_floating_point() else tensor.dtype
    if device.type == "cpu":
        return tensor.to(dtype=wanted, copy=True)
    return tensor.to(device=device, copy=True).to(wanted)


def _set(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, param)
