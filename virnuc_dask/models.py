"""Models: fair-esm's ESM-2 names, where their weights live, and safe loading.

One small registry maps each fair-esm ESM-2 name to its shape, so adding a model is one line.
Weights come from where fair-esm itself keeps them (``torch.hub.get_dir()/checkpoints``), from
an explicit checkpoint file, or from a seeded random initialisation of the real architecture
(for smoke tests and capacity planning). Checkpoints are read with ``weights_only=True`` and an
allow-list of exactly the classes fair-esm's files contain: fair-esm 2.0.0's own local loader
unpickles arbitrary objects and fails on torch >= 2.6.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from virnuc_dask.errors import VirnucError


@dataclass(frozen=True)
class ModelSpec:
    """The shape of one ESM-2 architecture, as fair-esm builds it."""

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
    # machines, always with random weights.
    ModelSpec("esm2_t2_tiny", 2, 64, 4),
]
#: Every model name this package knows, mapped to its architecture.
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}

#: The model VirNucPro used and the default here.
DEFAULT_MODEL = "esm2_t36_3B_UR50D"


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights come from: a checkpoint file, or a seeded random init.

    The description (``describe()``) goes into the output file's attributes and into the
    fingerprint that decides whether a finished shard may be reused.
    """

    model: str
    checkpoint: str | None = None
    seed: int | None = None
    sha256: str | None = None

    @property
    def is_random(self) -> bool:
        """True when the weights are random, not a trained model."""
        return self.checkpoint is None

    def describe(self) -> str:
        """One line naming the source: ``random (seed N)`` or the file and its checksum."""
        if self.is_random:
            return f"random (seed {self.seed}): not a trained model"
        return f"{self.checkpoint} (sha256 {self.sha256})"


def model_spec(name: str) -> ModelSpec:
    """Return the architecture of a model by its fair-esm name, or raise a user error."""
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(MODELS)
        raise VirnucError(f"unknown model {name!r}; choose one of: {known}") from None


def hub_checkpoint(name: str) -> Path:
    """Return where fair-esm keeps the weights of ``name`` in the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"


def resolve_weights(
    name: str, *, checkpoint: str | Path | None = None, random_weights: bool = False, seed: int = 0
) -> WeightsSource:
    """Decide where the weights of a run come from, checking that the file exists.

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
    """
    model_spec(name)
    if random_weights:
        if checkpoint is not None:
            raise VirnucError("--checkpoint and --random-weights exclude each other; pick one")
        return WeightsSource(name, seed=seed)
    path = Path(checkpoint) if checkpoint is not None else hub_checkpoint(name)
    if not path.is_file():
        if checkpoint is not None:
            raise VirnucError(f"checkpoint {path} does not exist")
        raise VirnucError(
            f"weights of {name} not found at {path}; download "
            f"https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt (and "
            f"{name}-contact-regression.pt from .../fair-esm/regression/) into {path.parent}, "
            "pass --checkpoint PATH, or use --random-weights for a smoke test"
        )
    return WeightsSource(name, checkpoint=str(path.resolve()), sha256=file_sha256(path))


def file_sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> dict:
    """Read a fair-esm checkpoint without unpickling arbitrary objects.

    fair-esm's files hold tensors, plain containers and ``argparse.Namespace`` (the model
    configuration); nothing else is allowed. A file that needs any other class is refused.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise VirnucError(
            f"refusing to load {path}: it needs objects outside the allow-list of a fair-esm "
            f"checkpoint (tensors, containers, argparse.Namespace): {str(error).splitlines()[0]}"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        raise VirnucError(f"cannot read checkpoint {path}: {error}") from None


def load_model(source: WeightsSource) -> torch.nn.Module:
    """Build the ESM-2 module of ``source`` on the CPU, in fp32 and eval mode.

    Random weights are drawn on the CPU from a private generator seeded with ``source.seed``,
    so every worker process builds bit-identical weights whatever device it will run on.
    Checkpoints go through fair-esm's own ``load_model_and_alphabet_core`` after a safe read.
    """
    import esm

    spec = model_spec(source.model)
    if source.is_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.seed)
            model = esm.ESM2(
                num_layers=spec.num_layers,
                embed_dim=spec.embed_dim,
                attention_heads=spec.attention_heads,
                alphabet="ESM-1b",
                token_dropout=True,
            )
        return model.eval()

    path = Path(source.checkpoint)
    data = read_checkpoint(path)
    if "cfg" not in data or "model" not in data:
        raise VirnucError(f"{path} is not an ESM-2 checkpoint in fair-esm's format")
    regression_path = path.with_name(path.stem + "-contact-regression.pt")
    regression = read_checkpoint(regression_path) if regression_path.is_file() else None
    # fair-esm picks its ESM-2 loader by the name's prefix; the file may be named anything.
    loader_name = path.stem if path.stem.startswith("esm2") else f"esm2_{path.stem}"
    with warnings.catch_warnings():
        # Without the contact-regression file fair-esm warns that contacts will be wrong;
        # embeddings do not use the contact head.
        warnings.filterwarnings("ignore", message="Regression weights not found")
        try:
            model, _ = esm.pretrained.load_model_and_alphabet_core(loader_name, data, regression)
        except (RuntimeError, AttributeError, KeyError) as error:
            raise VirnucError(f"{path} does not match the ESM-2 architecture: {error}") from None
    if (model.num_layers, model.embed_dim) != (spec.num_layers, spec.embed_dim):
        raise VirnucError(
            f"{path} holds a {model.num_layers}-layer, {model.embed_dim}-wide model, "
            f"not {spec.name}; pass the matching --model"
        )
    return model.eval()
