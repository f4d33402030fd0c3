"""Where a model's weights come from, and how a checkpoint file is identified.

Weights come from where fair-esm itself keeps them (``torch.hub.get_dir()/checkpoints``), from
an explicit checkpoint file, or from a seeded random initialisation of the real architecture
(for smoke tests and capacity planning): :class:`WeightsSource` says which.

Decisions:

- A checkpoint is identified by its SHA-256, computed once per file and remembered in a small
  per-user cache keyed by path, size, mtime and ctime, so workers re-check it cheaply: a file
  changed between the driver's check and a worker's load is refused.
- The torch hub folder is found as torch finds it (``TORCH_HOME``, ``XDG_CACHE_HOME``), without
  importing torch: naming models and ``--help`` must not pay for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


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
