"""Worker side: the model stays resident on each worker, and one task embeds one chunk.

:class:`ModelPlugin` is a ``distributed.WorkerPlugin``: registered once per run, it builds the
engine on every worker (and on workers that join later), off the event loop so heartbeats go
on while a 3B model loads. The model never travels through the scheduler: the plugin carries
only the description of the weights. :func:`embed_chunk` is the task body; it finds the engine
through ``get_worker()``, reads its sequences by offset, embeds them and writes one shard.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import numpy as np
from distributed import WorkerPlugin, get_worker

from virnuc_dask.errors import VirnucError
from virnuc_dask.models import WeightsSource
from virnuc_dask.output import ShardInfo, write_shard
from virnuc_dask.partition import Chunk

PLUGIN_NAME = "virnuc-dask-model"


class ChunkError(VirnucError):
    """A chunk whose embedding failed, naming the chunk and its sequences.

    Dask retries the task a bounded number of times (``retries``); if it still fails, the run
    stops with this message and the finished shards stay for ``--resume``.
    """


# The per-worker engine cache: reused when a later run on the same cluster asks for the same
# model and settings, replaced when it asks for another.
_ENGINES: dict[tuple, object] = {}


@dataclass(frozen=True)
class EngineSettings:
    """What a worker needs to build its engine (small, sent once per run)."""

    weights: WeightsSource
    dtype: str
    layers: tuple[int, ...]
    max_residues: int
    tokens_per_batch: int | None
    compile: bool | None
    torch_threads: int | None = None


class ModelPlugin(WorkerPlugin):
    """Load the ESM-2 model once per worker and keep it resident for every chunk task.

    Parameters
    ----------
    settings
        Weights, precision, layers and batching of the run's engine.

    Notes
    -----
    On a GPU worker the device is ``cuda:0``: ``LocalCUDACluster`` and ``dask cuda worker``
    give each worker its own GPU through ``CUDA_VISIBLE_DEVICES``. On a CPU worker, Dask sets
    ``OMP_NUM_THREADS=1``; ``settings.torch_threads`` gives torch the worker's share of cores.
    """

    name = PLUGIN_NAME

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings

    async def setup(self, worker) -> None:
        """Build the engine in a thread, so the worker keeps answering the scheduler."""
        await asyncio.get_running_loop().run_in_executor(None, self._load)

    def _load(self) -> None:
        import torch

        from virnuc_dask.engine import build_engine
        from virnuc_dask.models import load_model

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        if self.settings in _ENGINES:
            return
        _ENGINES.clear()
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        started = time.perf_counter()
        model = load_model(self.settings.weights)
        engine = build_engine(
            model,
            device=device,
            dtype=self.settings.dtype,
            layers=list(self.settings.layers),
            max_residues=self.settings.max_residues,
            tokens_per_batch=self.settings.tokens_per_batch,
            compile=self.settings.compile,
        )
        engine.load_seconds = time.perf_counter() - started
        _ENGINES[self.settings] = engine


def worker_engine(settings: EngineSettings):
    """Return this worker's engine for ``settings``, loading it if the plugin has not."""
    if settings not in _ENGINES:
        # A worker that restarted between the plugin's setup and this task: load here.
        ModelPlugin(settings)._load()
    return _ENGINES[settings]


@dataclass(frozen=True)
class ChunkJob:
    """Everything a chunk task needs besides its chunk: paths and the run's identity."""

    index_dir: str
    order_path: str
    shard_dir: str
    fingerprint: str
    output_dtype: str
    engine: EngineSettings


def shard_path(shard_dir: str, chunk: Chunk) -> str:
    """The shard file of a chunk."""
    return os.path.join(shard_dir, f"shard-{chunk.number:06d}.h5")


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

    from virnuc_dask.index import FastaIndex, read_sequences

    started = time.perf_counter()
    engine = worker_engine(job.engine)
    index = FastaIndex.load(job.index_dir)
    rows = np.array(np.load(job.order_path, mmap_mode="r")[chunk.start : chunk.stop])
    sequences = read_sequences(index, rows)
    try:
        # Grad mode is thread-local and Dask runs tasks in its own threads: set it here.
        with torch.inference_mode():
            embedding = engine.embed(sequences)
    except Exception as error:
        ids = index.ids(rows[:5])
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        raise ChunkError(
            f"chunk {chunk.number} ({len(rows)} sequences: {', '.join(ids)}{more}) failed: "
            f"{type(error).__name__}: {error}"
        ) from error
    path = shard_path(job.shard_dir, chunk)
    write_shard(
        path,
        rows=rows,
        ids=index.ids(rows),
        embedding=embedding,
        fingerprint=job.fingerprint,
        dtype=job.output_dtype,
    )
    try:
        worker = get_worker().address
    except ValueError:
        worker = "local"
    return ShardInfo(
        chunk.number, path, chunk.size, chunk.tokens, worker, time.perf_counter() - started
    )
