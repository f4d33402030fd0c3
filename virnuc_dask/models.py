"""Models: fair-esm's ESM-2 names, where their weights live, and safe, fast loading.

One small registry maps each fair-esm ESM-2 name to its shape, so adding a model is one line.
Weights come from where fair-esm itself keeps them (``torch.hub.get_dir()/checkpoints``), from
an explicit checkpoint file, or from a seeded random initialisation of the real architecture
(for smoke tests and capacity planning).

Decisions:

- A bad checkpoint fails on the driver, before any cluster starts: :func:`resolve_weights`
  reads the file's description of its tensors (not their data) and checks its configuration
  and every tensor's name and shape against the architecture, computed from the registry
  (:func:`expected_shapes`) without building a model. It does so without importing torch
  (:mod:`virnuc_dask.checkpoint_layout`): the driver never computes with the weights, and
  importing torch would add seconds to every command.
- Checkpoints are read with ``weights_only=True`` and an allow-list of exactly the classes
  fair-esm's files contain (``argparse.Namespace``): fair-esm 2.0.0's own local loader
  unpickles arbitrary objects and fails on torch >= 2.6.
- A checkpoint's model is built without initialising its weights and its tensors assigned
  from the mapped file, renamed as fair-esm renames them, instead of fair-esm's ``ESM2(...)``
  on the CPU, which randomly initialises every weight first (25 s for 3B) only to overwrite
  it. Floating tensors cross to a GPU in the file's dtype and are cast there. The result is
  bitwise the model fair-esm's ``load_model_and_alphabet_core`` builds: floating tensors in
  fp32 (or the asked dtype), the tied embedding/LM-head weight tied again, the rotary
  frequencies recomputed if the file lacks them. The model owns its memory: a file rewritten
  in place during a run must not change (or crash) a worker's model through the mapping.
- Random weights keep the plain CPU construction, seeded: bit-identical on every worker.
- A checkpoint is identified by its SHA-256, computed once per file and remembered in a small
  per-user cache keyed by path, size, mtime and ctime, so workers re-check it cheaply: a file
  changed between the driver's check and a worker's load is refused.
- torch and fair-esm are imported inside the functions that use them: naming models, reading
  the registry and the command line's ``--help`` must not pay for importing torch.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from virnuc_dask.checkpoint_layout import TensorLayout, is_zip_checkpoint, read_layout
from virnuc_dask.errors import VirnucError, option

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """The shape of one ESM-2 architecture, as fair-esm builds it.

    Parameters
    ----------
    name
        fair-esm's name of the model.
    num_layers
        Transformer layers.
    embed_dim
        Width of the representations.
    attention_heads
        Attention heads per layer.
    """

    name: str
    num_layers: int
    embed_dim: int
    attention_heads: int


_SPECS = [
    ModelSpec("esm2_t6_8M_UR50D", 6, 320, 20),
    ModelSpec("esm2_t12_35M_UR50D", 12, 480, 20),
    ModelSpec("esm2_t30_150M_UR50D", 30, 640, 20),
    ModelSpec("esm2_t33_650M_UR50D", 33, 1280, 20),
    ModelSpec("esm2_t36_3B_UR50D", 36, 2560, 40),
    ModelSpec("esm2_t48_15B_UR50D", 48, 5120, 40),
    # Not a published model: a 2-layer, 64-wide ESM-2 for tests and smoke runs on small
    # machines, usually with random weights.
    ModelSpec("esm2_t2_tiny", 2, 64, 4),
]
#: Every model name this package knows, mapped to its architecture.
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}

#: The model VirNucPro used and the default here.
DEFAULT_MODEL = "esm2_t36_3B_UR50D"

# Tokens of fair-esm's "ESM-1b" alphabet, which every ESM-2 model uses.
_ALPHABET_SIZE = 33
# The contact head's weights live in a separate file; embeddings never use them.
_REGRESSION_KEYS = ("contact_head.regression.weight", "contact_head.regression.bias")
# What fair-esm strips from checkpoint names (``_load_model_and_alphabet_core_v2``).
_PREFIXES = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
# ``torch.save``'s zip format (memory-mappable) and its legacy pickle format.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
# Entries the digest cache keeps (one per checkpoint file seen).
_CACHE_ENTRIES = 256


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights come from: a checkpoint file, or a seeded random init.

    :meth:`identity` goes into the fingerprint that decides whether a finished shard may be
    reused; :meth:`describe` into the output file's attributes.

    Parameters
    ----------
    model
        fair-esm's model name (see :data:`MODELS`).
    checkpoint
        Absolute path of the checkpoint file; ``None`` for random weights.
    seed
        Seed of random weights.
    sha256
        Digest of the checkpoint when the run was prepared; workers refuse a file that no
        longer has it.
    """

    model: str
    checkpoint: str | None = None
    seed: int | None = None
    sha256: str | None = None

    @property
    def is_random(self) -> bool:
        """True when the weights are random, not a trained model."""
        return self.checkpoint is None

    def identity(self) -> dict:
        """What determines the weights, for fingerprints: the model and its digest or seed.

        The checkpoint's path is left out: the same file moved elsewhere holds the same model.
        """
        if self.is_random:
            return {"model": self.model, "weights": "random", "seed": self.seed}
        return {"model": self.model, "weights": f"sha256:{self.sha256}"}

    def describe(self) -> str:
        """One human-readable line: the model, and its random seed or its file and checksum."""
        if self.is_random:
            return f"{self.model}, random weights (seed {self.seed}): not a trained model"
        return f"{self.model} from {self.checkpoint} (sha256 {self.sha256})"


def model_spec(name: str) -> ModelSpec:
    """Return the architecture of a model by its fair-esm name.

    Raises
    ------
    VirnucError
        The name is not in :data:`MODELS`; the message lists the known names.
    """
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(MODELS)
        raise VirnucError(f"unknown model {name!r}; choose one of: {known}") from None


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of fair-esm's ESM-2 of shape ``spec``, named as in its state dict.

    Computed from the shape alone, so the driver checks a checkpoint without building a
    model (tests compare it with fair-esm's own module).
    """
    d, v, heads = spec.embed_dim, _ALPHABET_SIZE, spec.attention_heads
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (v, d)}
    for i in range(spec.num_layers):
        layer = {
            **{f"self_attn.{p}_proj.weight": (d, d) for p in ("k", "v", "q", "out")},
            **{f"self_attn.{p}_proj.bias": (d,) for p in ("k", "v", "q", "out")},
            "self_attn.rot_emb.inv_freq": (d // heads // 2,),
            "self_attn_layer_norm.weight": (d,),
            "self_attn_layer_norm.bias": (d,),
            "fc1.weight": (4 * d, d),
            "fc1.bias": (4 * d,),
            "fc2.weight": (d, 4 * d),
            "fc2.bias": (d,),
            "final_layer_norm.weight": (d,),
            "final_layer_norm.bias": (d,),
        }
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes.update(
        {
            "contact_head.regression.weight": (1, spec.num_layers * heads),
            "contact_head.regression.bias": (1,),
            "emb_layer_norm_after.weight": (d,),
            "emb_layer_norm_after.bias": (d,),
            "lm_head.weight": (v, d),
            "lm_head.bias": (v,),
            "lm_head.dense.weight": (d, d),
            "lm_head.dense.bias": (d,),
            "lm_head.layer_norm.weight": (d,),
            "lm_head.layer_norm.bias": (d,),
        }
    )
    return shapes


def hub_dir(environ: dict[str, str] | None = None) -> Path:
    """The torch hub directory, as ``torch.hub.get_dir()`` gives it, without importing torch.

    ``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``.
    Once torch is imported, torch itself answers, so ``torch.hub.set_dir`` is honoured.

    Parameters
    ----------
    environ
        Environment to read; default: this process's.
    """
    if environ is None:
        if "torch" in sys.modules:
            import torch.hub

            return Path(torch.hub.get_dir())
        environ = dict(os.environ)
    # The same expression as torch.hub._get_torch_home, empty variables included.
    cache = environ.get("XDG_CACHE_HOME", "~/.cache")
    torch_home = os.path.expanduser(environ.get("TORCH_HOME", os.path.join(cache, "torch")))
    return Path(torch_home) / "hub"


def hub_checkpoint(name: str) -> Path:
    """Return where fair-esm keeps the weights of ``name`` in the torch hub cache."""
    return hub_dir() / "checkpoints" / f"{name}.pt"


def regression_file(path: str | Path) -> Path:
    """The contact-regression file fair-esm expects next to checkpoint ``path``."""
    path = Path(path)
    return path.with_name(path.stem + "-contact-regression.pt")


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


def _download_hint(name: str) -> str:
    return (
        f"https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt (and "
        f"{name}-contact-regression.pt from .../fair-esm/regression/)"
    )


def file_sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def digest_cache_dir() -> Path:
    """The per-user cache of checkpoint digests: ``$XDG_CACHE_HOME/virnuc-dask``.

    ``~/.cache/virnuc-dask`` when ``XDG_CACHE_HOME`` is unset, empty or relative (as the XDG
    specification asks).
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "virnuc-dask"


def checkpoint_digest(path: str | Path) -> str:
    """SHA-256 of a checkpoint, hashed once per version of the file and then cached.

    The cache (``digests.json`` in :func:`digest_cache_dir`) is keyed by the resolved path,
    size, mtime and ctime (ctime catches a copy that preserved the mtime). A cache that
    cannot be read or written is skipped: the digest is then computed every time.
    """
    path = Path(path).resolve()
    key = str(path)
    before = _file_stamp(path)
    cache_file = digest_cache_dir() / "digests.json"
    entry = _read_cache(cache_file).get(key)
    if isinstance(entry, dict) and entry.get("stamp") == before and "sha256" in entry:
        return entry["sha256"]
    logger.info("computing the sha256 of %s (%.1f GB), once for this file", path, before[0] / 1e9)
    digest = file_sha256(path)
    # A file written while it was being hashed has no trustworthy digest to remember.
    if _file_stamp(path) == before:
        _remember(cache_file, key, {"stamp": before, "sha256": digest})
    return digest


def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _read_cache(cache_file: Path) -> dict:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(cache_file: Path, key: str, entry: dict) -> None:
    # Workers of one machine may write at once: each writes a whole new file and renames
    # it, so the cache is never half-written; at worst one entry is lost and hashed again.
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(cache_file)
        entries.pop(key, None)
        entries[key] = entry
        kept = dict(list(entries.items())[-_CACHE_ENTRIES:])
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".digests-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(kept, f)
            os.replace(tmp, cache_file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as error:
        logger.debug("checkpoint digest cache %s not written: %s", cache_file, error)


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
    :func:`~virnuc_dask.checkpoint_layout.read_layout` on the driver, which describes them
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


def _published() -> set[str]:
    return {name for name in MODELS if name.endswith("UR50D")}


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
