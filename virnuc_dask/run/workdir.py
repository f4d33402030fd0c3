"""The work directory of a run: its locks, saved partition, shards, and what may be reused.

Layout (default ``OUTPUT.work`` beside the output): ``.virnuc-dask`` (the ownership marker),
``lock``, ``manifest.json`` (fingerprint and chunks), ``order.npy`` (the partition),
``sources.npy`` (each row's source: :mod:`~virnuc_dask.plan.distinct`), ``index/``
(the saved index), ``staging/`` (gzip inputs decompressed for seeking), ``shards/`` (one file
per finished chunk) and, for local clusters, ``dask-scratch/``.

Decisions:

- The tool creates the work directory itself and marks it
  (:mod:`~virnuc_dask.storage.ownership`). An existing folder is used only to resume, and only
  if it carries the marker: a folder of the user's given as the work directory is refused and
  never touched, with or without resume.
- The *fingerprint* hashes the inputs' bytes, the model's name and the weights' identity
  (checkpoint digest, or the seed of random weights), the torch and fair-esm versions, the
  engine's version (:data:`~virnuc_dask.engine.ENGINE_VERSION`) and every setting that changes
  the stored numbers, the translation of reads included (genetic code, frames, shortest
  peptide, piece size). A shard is reused only under the same fingerprint, for the same rows.
- A run never throws finished work away unasked: resuming a work directory whose finished
  chunks have another fingerprint is refused, naming each setting that differs (the
  manifest keeps what the fingerprint hashes) with the two ways out: the earlier settings,
  or ``restart`` to discard them. A work directory without finished chunks is simply reused.
- The work directory may be an fsspec URL (:class:`~virnuc_dask.storage.remote.Remote`), so that
  nodes share nothing but the object store: the same layout under a prefix, every file
  written in one PUT (so never seen half-written), the locks as leases
  (:mod:`~virnuc_dask.storage.locks`). No ``dask-scratch/`` there: a local cluster's scratch space
  stays on the driver's disk.
- A resumed run keeps the partition *and the sources* of the run it resumes (which rows are
  embedded and which get another's values), whatever its own ``dedup`` setting: the finished
  shards hold exactly those rows. The fingerprint does not include ``dedup``: the numbers
  are the same either way.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from virnuc_dask.config import EmbedConfig
from virnuc_dask.errors import VirnucError, option
from virnuc_dask.inputs import FastaIndex
from virnuc_dask.output import ShardInfo, shard_matches
from virnuc_dask.output.shards import shard_path
from virnuc_dask.plan.distinct import identity as identity_sources
from virnuc_dask.plan.fingerprint import differences, fingerprint_of
from virnuc_dask.plan.partition import Chunk, Partition, partition
from virnuc_dask.storage import ownership
from virnuc_dask.storage.locks import RunLock
from virnuc_dask.storage.remote import Remote, load_npy, place, save_npy, write_atomic

logger = logging.getLogger(__name__)


#: The kind recorded in the work directory's ownership marker.
KIND = "work directory"


def lock_and_open(
    output: Path | Remote,
    work: Path | Remote,
    resume: bool,
    token: str = "",
    restart: bool = False,
) -> tuple[list[RunLock], dict | None]:
    """Lock the output, open the work directory (see :func:`open_work_dir`) and lock it.

    Returns the locks (output first) and the earlier run's manifest when resuming or
    restarting (else None).
    """
    locks = [RunLock(output.with_name(output.name + ".lock"), f"output {output}", token).acquire()]
    try:
        saved = open_work_dir(work, resume or restart)
        locks.append(RunLock(work / "lock", f"work directory {work}", token).acquire())
    except BaseException:
        locks[0].release()
        raise
    return locks, saved


def open_work_dir(work: Path | Remote, resume: bool) -> dict | None:
    """Create and mark the work directory, or return an earlier run's manifest when resuming
    (or restarting: ``resume`` is then set too; its shards go once the directory is locked).

    Raises
    ------
    VirnucError
        When the folder exists and ``resume`` is not set, when it is not a work directory this
        tool made (it is then left untouched), or when its manifest is damaged.
    """
    if not work.exists() and not work.is_symlink():
        try:
            ownership.claim(work, KIND)
        except OSError as error:
            raise VirnucError(
                f"cannot create the work directory {work}: {error.strerror or error}"
            ) from None
        return None
    hint = f"give {option('work_dir', 'DIR')} a path that does not exist yet"
    ownership.require_owned(work, KIND, hint=hint)
    if not resume:
        raise VirnucError(
            f"work directory {work} exists from an earlier run; pass {option('resume')} to "
            f"reuse its finished chunks, or {option('restart')} to discard them"
        )
    manifest = work / "manifest.json"
    if not manifest.exists():
        return {}
    try:
        saved = json.loads(manifest.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        raise VirnucError(
            f"the manifest {manifest} of the work directory is damaged ({error}); remove the "
            f"work directory {work} and run again without {option('resume')}"
        ) from None
    return saved


def remove(work: Path | Remote) -> None:
    """Remove the work directory after a successful run (only if this tool made it)."""
    ownership.remove(work, KIND)


def finished_count(work: Path | Remote) -> int:
    """How many finished chunks (shards) the work directory holds."""
    shards = work / "shards"
    return len(list(shards.glob("shard-*.h5"))) if shards.is_dir() else 0


def remove_if_unused(work: Path | Remote) -> bool:
    """Remove the work directory when no chunk has been finished in it yet; say whether it was.

    After a failure before the first shard there is nothing to resume: leaving the folder
    behind would only make the corrected rerun ask for ``resume``.
    """
    if finished_count(work):
        return False
    ownership.remove(work, KIND)
    return True


def _refuse_other_settings(work: Path | Remote, saved: dict, settings: dict, count: int):
    changed = (
        "; ".join(differences(saved["settings"], settings))
        if isinstance(saved.get("settings"), dict)
        else "its manifest does not record which"
    )
    return VirnucError(
        f"work directory {work} holds {count} finished chunk{'s' if count != 1 else ''} of a "
        f"run with other inputs or settings ({changed}); rerun with that run's settings to "
        f"reuse them, or pass {option('restart')} to discard them and start over"
    )


def saved_or_new_partition(
    work: Path | Remote,
    saved: dict | None,
    settings: dict,
    index: FastaIndex,
    lanes: int,
    config: EmbedConfig,
    restart: bool = False,
    sources: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> tuple[Partition, np.ndarray]:
    """The saved partition and sources of an earlier run of the same fingerprint, else new ones.

    ``settings`` is this run's :func:`identity`; ``sources`` each row's source row (default:
    every row its own) and ``rows`` the rows to embed (default: all), for a new partition.
    Finished chunks of an earlier run with another fingerprint are never discarded unasked:
    that raises :class:`VirnucError` naming what differs, unless ``restart`` asks to discard
    them.
    """
    if sources is None:
        sources = identity_sources(len(index))
    fingerprint = fingerprint_of(settings)
    finished = finished_count(work) if saved else 0
    if finished and (restart or saved.get("fingerprint") != fingerprint):
        if not restart:
            raise _refuse_other_settings(work, saved, settings, finished)
        logger.warning(
            "discarding %d finished chunks of an earlier run in %s, as %s asks",
            finished,
            work,
            option("restart"),
        )
    elif saved and saved.get("fingerprint") == fingerprint:
        try:
            parts = Partition(
                order=load_npy(work / "order.npy"),
                chunks=[Chunk(**c) for c in saved["chunks"]],
                lanes=saved["lanes"],
            )
            saved_sources = work / "sources.npy"
            if saved_sources.exists():
                sources = load_npy(saved_sources)
            else:  # saved by a version that embedded every row
                sources = identity_sources(len(index))
            return parts, sources
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise VirnucError(
                f"the work directory {work} is damaged ({type(error).__name__}: {error}); "
                f"remove it and run again without {option('resume')}"
            ) from None
    if saved:
        for stale in (work / "shards").glob("*shard-*"):
            stale.unlink()
    parts = partition(
        index.length, lanes, config.chunk_tokens, config.max_residues, config.long, rows=rows
    )
    save_npy(work / "order.npy", parts.order)
    save_npy(work / "sources.npy", sources)
    (work / "shards").mkdir(exist_ok=True)
    manifest = {
        "fingerprint": fingerprint,
        "settings": settings,
        "lanes": parts.lanes,
        "chunks": [asdict(c) for c in parts.chunks],
    }
    # Written whole or not at all: a killed driver never leaves a truncated manifest.
    write_atomic(work / "manifest.json", json.dumps(manifest).encode())
    ownership.write_marker(work, KIND, fingerprint)
    return parts, sources


def finished_shards(work: Path | Remote, parts: Partition, fingerprint: str) -> list[ShardInfo]:
    """Shards on disk that are complete and belong to this run; anything else is removed."""
    from virnuc_dask.output.publish import shard_source

    for partial in (work / "shards").glob(".*.partial"):
        logger.warning("removing the half-written shard %s", partial.name)
        partial.unlink()
    storage = place(work).storage
    present = {p.name for p in (work / "shards").glob("shard-*.h5")}
    reused = []
    for chunk in parts.chunks:
        path = shard_path(str(work / "shards"), chunk)
        if os.path.basename(path) not in present:
            continue
        rows = parts.order[chunk.start : chunk.stop]
        if shard_matches(shard_source(path, storage), fingerprint, rows):
            reused.append(ShardInfo(chunk.number, path, chunk.size, chunk.tokens, "resumed", 0.0))
        else:
            logger.warning("shard %s does not match this run: recomputing it", path)
            (work / "shards" / os.path.basename(path)).unlink(missing_ok=True)
    return reused
