"""One task embeds one chunk: read its sequences, embed them, write its shard.

:func:`embed_chunk` is the body of every chunk task; it finds the worker's engine
(:mod:`~virnuc_dask.cluster.plugin`), reads its sequences by offset, embeds them under a time
limit (:mod:`~virnuc_dask.cluster.watchdog`), tells the driver how far it is
(:mod:`~virnuc_dask.cluster.events`) and writes one shard.

Decisions:

- A chunk whose shard is already on disk with the run's fingerprint and rows is not computed
  again: when Dask re-runs a finished task because its small result lived on a lost worker,
  the task returns the shard at once, so a lost worker costs only its chunk in flight.
- A task writes its shard only while its run still holds the work directory's lock (the
  lock carries the run's token): a task that outlives an interrupted run writes nothing.
- A work directory at a URL: the worker copies the saved index and partition to its own disk
  once per run (its Dask local directory, :func:`_local_copy`) and memory-maps them there, as
  it would on a shared filesystem; its inputs it reads by byte range from their URLs; its
  shard it writes to its own disk and puts in one call (atomic on object stores). So the
  worker needs nothing of the driver's disk, only the store and the run's storage options.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from distributed import get_worker

from virnuc_dask.cluster.events import BatchReporter
from virnuc_dask.cluster.plugin import EngineSettings, state_of, worker_engine
from virnuc_dask.cluster.watchdog import _Watchdog, assumed_rate, time_limit
from virnuc_dask.errors import VirnucError
from virnuc_dask.output import ShardInfo, shard_matches, write_shard
from virnuc_dask.output.residues import ShardResidues
from virnuc_dask.output.shards import shard_path
from virnuc_dask.output.targets import partial_name
from virnuc_dask.plan.partition import Chunk
from virnuc_dask.plan.windows import embedded_residues
from virnuc_dask.storage.locks import holds
from virnuc_dask.storage.remote import Remote, download_folder
from virnuc_dask.storage.urls import StorageOptions, is_url


class ChunkError(VirnucError):
    """A chunk whose embedding failed, naming the chunk and its sequences.

    Dask retries the task a bounded number of times (``retries``); if it still fails, the run
    stops with this message and the finished shards stay for ``--resume``.
    """


class RunAbandoned(VirnucError):
    """A chunk task whose run no longer holds the work directory: its result is discarded."""


@dataclass(frozen=True)
class ChunkJob:
    """Everything a chunk task needs besides its chunk: paths and the run's identity.

    Attributes
    ----------
    index_dir, order_path, shard_dir
        The saved index, the partition's order and the shard folder, in the work directory.
    fingerprint
        The run's fingerprint, stored in every shard.
    output_dtype
        Stored precision of the shards.
    engine
        What the worker's engine is built from.
    lock_path, token
        The work directory's lock and the run's token: shards are written only while the
        lock holds this token.
    width
        Features per layer (the model's width), checked when reusing a shard.
    chunk_seconds
        Time limit of a chunk; None: automatic (:func:`time_limit`); 0: none.
    storage
        fsspec options for the URLs among these paths and the inputs (hidden in logs).
    per_residue, residue_dtype
        Also write every residue's rows into the shard, in this dtype.
    long
        How sequences longer than the engine's ``max_residues`` are embedded.
    """

    index_dir: str
    order_path: str
    shard_dir: str
    fingerprint: str
    output_dtype: str
    engine: EngineSettings
    lock_path: str = ""
    token: str = ""
    width: int | None = None
    chunk_seconds: float | None = None
    storage: StorageOptions | None = None
    per_residue: bool = False
    residue_dtype: str = "float16"
    long: str = "truncate"


#: Runs whose index a worker keeps on its disk (a work directory at a URL): the oldest go.
KEEP_RUNS = 4


def _local_copy(job: ChunkJob) -> tuple[str, str]:
    """The saved index and partition of a work directory at a URL, on this worker's disk.

    Downloaded once per run (the folder is named by the run's token) into the worker's Dask
    local directory, under a temporary name renamed when complete, so that concurrent tasks
    of the worker never read a half-copied index; copies of older runs are removed.
    """
    try:
        base = Path(get_worker().local_directory) / "virnuc-dask-runs"
    except ValueError:
        base = Path(tempfile.gettempdir()) / "virnuc-dask-runs"
    folder = base / job.token
    if not (folder / "complete").exists():
        partial = base / f".{job.token}.{uuid.uuid4().hex}.partial"
        try:
            download_folder(Remote(job.index_dir, job.storage), partial / "index")
            Remote(job.order_path, job.storage).get(partial / "order.npy")
            (partial / "complete").touch()
            os.rename(partial, folder)
        except OSError:
            if not (folder / "complete").exists():
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        runs = sorted(base.iterdir(), key=lambda p: p.stat().st_mtime)
        for old in [p for p in runs if not p.name.startswith(".")][:-KEEP_RUNS]:
            shutil.rmtree(old, ignore_errors=True)  # mapped files stay readable (POSIX)
    return str(folder / "index"), str(folder / "order.npy")


def embed_chunk(chunk: Chunk, job: ChunkJob) -> ShardInfo:
    """Embed one chunk on this worker and write its shard; the body of every Dask task.

    Parameters
    ----------
    chunk
        The positions of the partition's order this task covers.
    job
        Paths and settings shared by all chunks of the run.

    Returns
    -------
    ShardInfo
        The shard's path and counts, for the assembly step.
    """
    import torch

    from virnuc_dask.inputs import FastaIndex, read_sequences
    from virnuc_dask.output.publish import put_shard, shard_source

    started = time.perf_counter()
    path = shard_path(job.shard_dir, chunk)
    remote = is_url(path)
    index_dir, order_path = _local_copy(job) if remote else (job.index_dir, job.order_path)
    rows = np.array(np.load(order_path, mmap_mode="r")[chunk.start : chunk.stop])
    worker = _worker_address()
    exists = Remote(path, job.storage).is_file() if remote else os.path.exists(path)
    if exists and shard_matches(
        shard_source(path, job.storage),
        job.fingerprint,
        rows,
        layers=list(job.engine.layers),
        width=job.width,
        dtype=job.output_dtype,
    ):
        return ShardInfo(chunk.number, path, chunk.size, chunk.tokens, "existing", 0.0)
    state = state_of()
    engine = worker_engine(job.engine, state)
    index = FastaIndex.load(index_dir)
    sequences = read_sequences(index, rows, job.storage)
    measured = state.remembered_rate(job.engine)
    rate = measured or assumed_rate(
        sum(p.numel() for p in engine.model.parameters()),
        next(engine.model.parameters()).device.type,
        torch.get_num_threads(),
    )
    watchdog = _Watchdog(
        chunk.number,
        chunk.tokens,
        time_limit(chunk.tokens, job.chunk_seconds, rate),
        measured=measured is not None,
        adjust=job.chunk_seconds is None,
    )
    # A shard at a URL is written on this worker's disk, then put whole.
    local = Path(index_dir).parent / os.path.basename(path) if remote else Path(path)
    residues = None
    if job.per_residue:
        # The residues go into the shard batch by batch: the chunk's rows are never all in
        # this process's memory (a chunk of 3B on 2 M tokens would be 10 GB in float16).
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        residues = ShardResidues(
            partial_name(local),
            embedded_residues(lengths, job.engine.max_residues, job.long),
            layers=len(job.engine.layers),
            width=engine.model.embed_dim,
            dtype=job.residue_dtype,
        )
    try:
        try:
            # Grad mode is thread-local and Dask runs tasks in its own threads: set it here.
            with watchdog, torch.inference_mode():
                computing = time.perf_counter()
                embedding = engine.embed(
                    sequences,
                    on_batch=_on_batch(watchdog, _batch_reporter(job.token, chunk)),
                    long=job.long,
                    on_residues=residues.write if residues is not None else None,
                    residue_dtype=job.residue_dtype,
                )
        except Exception as error:
            raise ChunkError(
                f"{chunk.describe(index.ids(rows[:5]))} failed: {type(error).__name__}: {error}"
            ) from error
        rate = chunk.tokens / max(time.perf_counter() - computing, 1e-3)
        state.remember_rate(job.engine, rate)
        if job.lock_path and not holds(job.lock_path, job.token, job.storage):
            raise RunAbandoned(
                f"chunk {chunk.number}: the run that asked for it no longer holds "
                f"{job.lock_path}; its result is discarded"
            )
        if residues is not None:
            residues.close()
        write_shard(
            local,
            rows=rows,
            ids=index.ids(rows),
            embedding=embedding,
            fingerprint=job.fingerprint,
            dtype=job.output_dtype,
            layers=list(job.engine.layers),
            partial=residues.path if residues is not None else None,
        )
    finally:
        if residues is not None:
            residues.discard()  # a no-op once write_shard renamed it
    if remote:
        try:
            put_shard(local, path, job.storage)
        finally:
            os.unlink(local)
    return ShardInfo(
        chunk.number, path, chunk.size, chunk.tokens, worker, time.perf_counter() - started
    )


def _on_batch(watchdog: _Watchdog, reporter: BatchReporter | None):
    """The engine's ``on_batch``: the watchdog follows the chunk, the driver hears of it."""

    def on_batch(tokens: int) -> None:
        watchdog.batch(tokens)
        if reporter is not None:
            reporter(tokens)

    return on_batch


def _batch_reporter(token: str, chunk: Chunk) -> BatchReporter | None:
    """The callback that tells the run's driver how far a chunk is (None outside a worker)."""
    try:
        worker = get_worker()
    except ValueError:
        return None
    return BatchReporter(worker.log_event, token, chunk.number)


def _worker_address() -> str:
    try:
        return get_worker().address
    except ValueError:
        return "local"
