"""Reading a fair-esm checkpoint safely, and checking it against its architecture.

Decisions:

- A bad checkpoint fails on the driver, before any cluster starts: :func:`resolve_weights`
  reads the file's description of its tensors (not their data) and checks its configuration
  and every tensor's name and shape against the architecture, computed from the registry
  (:func:`~virnuc_dask.model.registry.expected_shapes`) without building a model. It does so
  without importing torch (:mod:`virnuc_dask.model.checkpoint_layout`): the driver never
  computes with the weights, and importing torch would add seconds to every command.
- Checkpoints are read with ``weights_only=True`` and an allow-list of exactly the classes
  fair-esm's files contain (``argparse.Namespace``): fair-esm 2.0.0's own local loader
  unpickles arbitrary objects and fails on torch >= 2.6.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from virnuc_dask.errors import VirnucError, option
from virnuc_dask.model.checkpoint_layout import TensorLayout, is_zip_checkpoint, read_layout
from virnuc_dask.model.registry import _SPECS, ModelSpec, _published, expected_shapes, model_spec
from virnuc_dask.model.weights import (
    WeightsSource,
    _download_hint,
    checkpoint_digest,
    hub_checkpoint,
    regression_file,
)

# The contact head's weights live in a separate file; embeddings never use them.
_REGRESSION_KEYS = ("contact_head.regression.weight", "contact_head.regression.bias")


# What fair-esm strips from checkpoint names (``_load_model_and_alphabet_core_v2``).
_PREFIXES = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")


# ``torch.save``'s zip format (memory-mappable) and its legacy pickle format.
_ZIP_MAGIC = b"PK\x03\x04"


_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def resolve_weights(
    name: str, *, checkpoint: str | Path | None = None, random_weights: bool = False, seed: int = 0
) -> WeightsSource:
    """Decide where the weights of a run come from, and check the checkpoint fully.

    The checkpoint is read memory-mapped: its configuration and the name and shape of every
    tensor must be those of ``name``; its SHA-256 is computed (once per file, then cached)
    so workers can prove they load the same bytes.

    Parameters
    ----------
    name
        A fair-esm model name (see :data:`MODELS`).
    checkpoint
        An explicit checkpoint file in fair-esm's format; default: the torch hub cache.
    random_weights
        Build the architecture with seeded random weights instead of loading any file.
    seed
        Seed of the random weights.

    Raises
    ------
    VirnucError
        The checkpoint is missing, a directory, unreadable, not fair-esm's format, or of
        another model; the message names the file, what is wrong and the fix.
    """
    spec = model_spec(name)
    if random_weights:
        if checkpoint is not None:
            raise VirnucError(
                f"{option('checkpoint', 'PATH')} and {option('random_weights')} exclude each "
                "other; pick one"
            )
        return WeightsSource(name, seed=seed)
    path = Path(checkpoint) if checkpoint is not None else hub_checkpoint(name)
    if path.is_dir():
        raise VirnucError(f"checkpoint {path} is a directory; give the .pt file")
    if not path.is_file():
        if checkpoint is not None:
            raise VirnucError(f"checkpoint {path} does not exist")
        raise VirnucError(
            f"weights of {name} not found at {path}; download {_download_hint(name)} into "
            f"{path.parent}, pass {option('checkpoint', 'PATH')}, or use "
            f"{option('random_weights')} for a smoke test"
        )
    path = path.resolve()
    _checked_state(path, spec, read=read_layout if is_zip_checkpoint(path) else read_checkpoint)
    return WeightsSource(name, checkpoint=str(path), sha256=checkpoint_digest(path))


def read_checkpoint(path: str | Path, *, mmap: bool = True) -> dict:
    """Read a fair-esm checkpoint, without unpickling arbitrary objects.

    fair-esm's files hold tensors, plain containers and ``argparse.Namespace`` (the model
    configuration); nothing else is allowed.

    Parameters
    ----------
    path
        The checkpoint file.
    mmap
        Leave the tensors in the file, memory-mapped, until they are used. Such tensors
        must not outlive a rewrite of the file: writing them back to the same path, or
        truncating the file, makes reading them crash the process (SIGBUS).

    Raises
    ------
    VirnucError
        The file needs any other class, is truncated or corrupt, or is not a PyTorch file.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        raise VirnucError(f"checkpoint {path} is a directory; give the .pt file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError as error:
        raise VirnucError(f"cannot read checkpoint {path}: {error}") from None
    if not head.startswith(_ZIP_MAGIC) and not head.startswith(_LEGACY_MAGIC):
        raise VirnucError(
            f"{path} is not a PyTorch checkpoint (a file written by torch.save); it may be "
            "incomplete or something else: download it again"
        )
    # torch.save's legacy format (torch < 1.6) cannot be memory-mapped; it is read whole.
    mmap = mmap and head.startswith(_ZIP_MAGIC)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        message = str(error)
        unsafe = re.search(r"GLOBAL (\S+)", message)
        if unsafe:
            raise VirnucError(
                f"refusing to load {path}: it needs {unsafe.group(1)}, outside the allow-list "
                "of a fair-esm checkpoint (tensors, containers, argparse.Namespace)"
            ) from None
        first = message.strip().splitlines()[0] if message.strip() else type(error).__name__
        raise VirnucError(
            f"cannot read checkpoint {path}: it is truncated or corrupt ({first}); "
            "download it again"
        ) from None


def _checked_state(
    path: Path, spec: ModelSpec, read=read_checkpoint
) -> tuple[dict, argparse.Namespace]:
    """The checkpoint's tensors named as ESM2 names them, checked against ``spec``.

    Returns the state dict (tensors still memory-mapped, the contact-regression file's
    merged in when it is there) and the model configuration. ``read`` is
    :func:`read_checkpoint` on a worker, which loads the tensors, or
    :func:`~virnuc_dask.model.checkpoint_layout.read_layout` on the driver, which describes them
    without importing torch.
    """
    data = read(path)
    fix = f"pass the .pt file of {spec.name} as fair-esm publishes it"
    if not isinstance(data, dict) or not {"cfg", "model"} <= data.keys():
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        hint = (
            "; it looks like an ESM-1 checkpoint"
            if isinstance(data, dict) and "args" in data
            else ""
        )
        raise VirnucError(
            f"{path} is not an ESM-2 checkpoint in fair-esm's format (a dict with 'cfg' and "
            f"'model'; found {found}){hint}; {fix}"
        )
    cfg = data["cfg"].get("model") if isinstance(data["cfg"], dict) else None
    fields = ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads", "token_dropout")
    if not isinstance(cfg, argparse.Namespace) or not all(hasattr(cfg, f) for f in fields):
        raise VirnucError(
            f"{path} has no ESM-2 configuration (cfg['model'] with {', '.join(fields)}); {fix}"
        )
    shape = (cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads)
    if shape != (spec.num_layers, spec.embed_dim, spec.attention_heads):
        match = [s.name for s in _SPECS if (s.num_layers, s.embed_dim, s.attention_heads) == shape]
        advice = f"pass {option('model', match[0])}" if match else "pass the matching model"
        raise VirnucError(
            f"{path} holds a {shape[0]}-layer, {shape[1]}-wide model with {shape[2]} heads, "
            f"not {spec.name}; {advice}, or the checkpoint of {spec.name}"
        )
    if not isinstance(data["model"], dict):
        raise VirnucError(f"{path}: 'model' is not a dict of tensors; {fix}")
    merged = dict(data["model"])
    regression = regression_file(path)
    if regression.is_file():
        extra = read(regression)
        if not isinstance(extra, dict) or not isinstance(extra.get("model"), dict):
            raise VirnucError(
                f"{regression} is not a contact-regression file in fair-esm's format; "
                "remove or replace it (embeddings do not use it)"
            )
        merged.update(extra["model"])
    state = {_PREFIXES.sub("", str(name)): tensor for name, tensor in merged.items()}

    expected = expected_shapes(spec)
    problems = []
    missing = [n for n in expected if n not in state and not _optional(n)]
    if missing:
        problems.append(f"{len(missing)} tensors missing ({_some(missing)})")
    unexpected = [n for n in state if n not in expected]
    if unexpected:
        problems.append(f"{len(unexpected)} unknown tensors ({_some(unexpected)})")
    not_tensors = [n for n in state if n in expected and not _is_tensor(state[n])]
    if not_tensors:
        problems.append(f"entries that are not tensors ({_some(not_tensors)})")
    wrong = [
        f"{n} {tuple(t.shape)} instead of {expected[n]}"
        for n, t in state.items()
        if n in expected and _is_tensor(t) and tuple(t.shape) != expected[n]
    ]
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape ({_some(wrong)})")
    if problems:
        where = "" if spec.name not in _published() else f" from {_download_hint(spec.name)}"
        raise VirnucError(
            f"{path} is not a complete {spec.name} checkpoint: {'; '.join(problems)}; "
            f"download it again{where}"
        )
    return state, cfg


def _is_tensor(value: object) -> bool:
    """A torch tensor, or a tensor described by the driver's torch-free reader."""
    if isinstance(value, TensorLayout):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _optional(name: str) -> bool:
    # The contact head comes from a separate file, and the rotary frequencies are a formula
    # of the shape: a checkpoint without them is still complete for embeddings.
    return name in _REGRESSION_KEYS or name.endswith(".rot_emb.inv_freq")


def _some(items: list[str], count: int = 3) -> str:
    more = f", ... ({len(items) - count} more)" if len(items) > count else ""
    return ", ".join(items[:count]) + more
