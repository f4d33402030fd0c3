"""The work directory of a run: its locks, saved partition, shards, and what may be reused.

Layout (default ``OUTPUT.work`` beside the output): ``lock``, ``manifest.json`` (fingerprint
and chunks), ``order.npy`` (the partition), ``index/`` (the saved index), ``staging/`` (gzip
inputs decompressed for seeking), ``shards/`` (one file per finished chunk) and, for local
clusters, ``dask-scratch/``. The *fingerprint* hashes the inputs' bytes and every setting that
changes the stored numbers; a shard is reused only under the same fingerprint, for the same rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from virnuc_dask.config import EmbedConfig
from virnuc_dask.errors import VirnucError
from virnuc_dask.index import FastaIndex
from virnuc_dask.lock import RunLock
from virnuc_dask.models import WeightsSource
from virnuc_dask.output import ShardInfo, shard_matches
from virnuc_dask.partition import Chunk, Partition, partition
from virnuc_dask.worker import shard_path

logger = logging.getLogger(__name__)


def lock_and_open(output: Path, work: Path, resume: bool) -> tuple[list[RunLock], dict | None]:
    """Lock the output, open the work directory (see :func:`open_work_dir`) and lock it."""
    locks = [RunLock(output.with_name(output.name + ".lock"), f"output {output}").acquire()]
    try:
        saved = open_work_dir(work, resume)
        locks.append(RunLock(work / "lock", f"work directory {work}").acquire())
    except BaseException:
        locks[0].release()
        raise
    return locks, saved


def open_work_dir(work: Path, resume: bool) -> dict | None:
    """Create the work directory, or return an earlier run's manifest when resuming."""
    if work.exists():
        if not resume:
            raise VirnucError(
                f"work directory {work} exists from an earlier run; pass --resume to reuse its "
                "finished chunks, or remove it"
            )
        manifest = work / "manifest.json"
        return json.loads(manifest.read_text()) if manifest.is_file() else {}
    work.mkdir()
    return None


def fingerprint(index: FastaIndex, weights: WeightsSource, config: EmbedConfig) -> str:
    """Hash of the inputs' bytes and of every setting that changes the stored numbers."""
    identity = {
        "inputs": index.digest,
        "weights": weights.describe(),
        "layers": config.layer_list(),
        "dtype": config.dtype,
        "output_dtype": config.output_dtype,
        "max_residues": config.max_residues,
        "invalid_to_x": config.invalid_to_x,
        "duplicate_ids": config.duplicate_ids,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def saved_or_new_partition(
    work: Path,
    saved: dict | None,
    fingerprint: str,
    index: FastaIndex,
    lanes: int,
    config: EmbedConfig,
) -> Partition:
    """The saved partition of an earlier run of the same fingerprint, else a new one."""
    if saved and saved.get("fingerprint") == fingerprint:
        return Partition(
            order=np.load(work / "order.npy"),
            chunks=[Chunk(**c) for c in saved["chunks"]],
            lanes=saved["lanes"],
        )
    if saved:
        logger.warning(
            "work directory %s holds shards of a run with other inputs or settings: "
            "recomputing every chunk",
            work,
        )
        shutil.rmtree(work / "shards", ignore_errors=True)
    parts = partition(index.length, lanes, config.chunk_tokens, config.max_residues)
    np.save(work / "order.npy", parts.order)
    (work / "shards").mkdir(exist_ok=True)
    manifest = {
        "fingerprint": fingerprint,
        "lanes": parts.lanes,
        "chunks": [asdict(c) for c in parts.chunks],
    }
    (work / "manifest.json").write_text(json.dumps(manifest))
    return parts


def finished_shards(work: Path, parts: Partition, fingerprint: str) -> list[ShardInfo]:
    """Shards on disk that are complete and belong to this run; anything else is removed."""
    for partial in (work / "shards").glob(".*.partial"):
        logger.warning("removing the half-written shard %s", partial.name)
        partial.unlink()
    reused = []
    for chunk in parts.chunks:
        path = shard_path(str(work / "shards"), chunk)
        if not os.path.exists(path):
            continue
        if shard_matches(path, fingerprint, parts.order[chunk.start : chunk.stop]):
            reused.append(ShardInfo(chunk.number, path, chunk.size, chunk.tokens, "resumed", 0.0))
        else:
            logger.warning("shard %s does not match this run: recomputing it", path)
            os.unlink(path)
    return reused
