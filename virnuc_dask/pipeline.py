"""The run: index, partition, a ``dask.delayed`` graph of chunk tasks and one assembly.

:func:`prepare` does everything that happens on the driver before the cluster computes
anything (validate settings and paths, index and validate the inputs, partition) and returns an
:class:`EmbeddingJob` whose :meth:`~EmbeddingJob.graph` is the unevaluated Dask graph: one
delayed ``embed_chunk`` per chunk and one delayed ``assemble`` over their results. In a notebook,
``job.graph().visualize()`` draws it; ``job.run(client)`` computes it. :func:`embed` does both
on a cluster that fits the machine.

Work directory (default ``OUTPUT.work``, next to the output): the index, the partition, gzip
inputs decompressed for seeking, and one shard per finished chunk. It is removed after a
successful run. With ``resume=True`` a run reuses the shards of an earlier run of the same
inputs and settings (same fingerprint); without it an existing work directory is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import dask
import numpy as np
from dask.delayed import Delayed

from virnuc_dask import workdir
from virnuc_dask.config import EmbedConfig
from virnuc_dask.errors import VirnucError
from virnuc_dask.index import FastaIndex, build_index
from virnuc_dask.lock import RunLock
from virnuc_dask.models import WeightsSource, resolve_weights
from virnuc_dask.output import POOLING, ShardInfo, assemble
from virnuc_dask.partition import Chunk, Partition
from virnuc_dask.worker import ChunkJob, EngineSettings, ModelPlugin, embed_chunk

logger = logging.getLogger(__name__)


@dataclass
class EmbeddingJob:
    """A prepared run: indexed inputs, chunks, and the settings every task shares.

    Attributes
    ----------
    config
        The run's settings.
    output
        Final HDF5 path.
    zarr
        Optional Zarr store path.
    work_dir
        The run's work directory.
    index
        The inputs' index.
    partition
        The chunks.
    weights
        Where the model's weights come from.
    fingerprint
        Identity of the inputs' contents and of every setting that changes the numbers.
    reused
        Shards of an earlier run that are reused (resume).
    torch_threads
        torch threads per CPU worker.
    report
        What the run did, once :meth:`run` has finished.
    locks
        The output's and work directory's locks, held from :func:`prepare` until :meth:`run`
        ends (or :meth:`release`).
    """

    config: EmbedConfig
    output: Path
    zarr: Path | None
    work_dir: Path
    index: FastaIndex
    partition: Partition
    weights: WeightsSource
    fingerprint: str
    reused: list[ShardInfo]
    torch_threads: int | None = None
    report: RunReport | None = None
    locks: list[RunLock] = dataclasses.field(default_factory=list, repr=False)

    @property
    def engine_settings(self) -> EngineSettings:
        """What each worker's :class:`~virnuc_dask.worker.ModelPlugin` loads."""
        c = self.config
        return EngineSettings(
            weights=self.weights,
            dtype=c.dtype,
            layers=tuple(c.layer_list()),
            max_residues=c.max_residues,
            tokens_per_batch=c.tokens_per_batch,
            compile=c.compile,
            torch_threads=self.torch_threads,
        )

    @property
    def todo(self) -> list[Chunk]:
        """Chunks still to compute."""
        done = {s.chunk for s in self.reused}
        return [c for c in self.partition.chunks if c.number not in done]

    def graph(self) -> Delayed:
        """The unevaluated graph: one task per chunk still to do, one assembly over all.

        Tasks are prioritised by their place in their lane, so the longest sequences of every
        lane run first and the run ends on short, quick chunks.
        """
        job = ChunkJob(
            index_dir=str(self.work_dir / "index"),
            order_path=str(self.work_dir / "order.npy"),
            shard_dir=str(self.work_dir / "shards"),
            fingerprint=self.fingerprint,
            output_dtype=self.config.output_dtype,
            engine=self.engine_settings,
        )
        job_node = dask.delayed(job, name="virnuc-job")
        rank = _rank_in_lane(self.partition.chunks)
        shards = list(self.reused)
        for chunk in self.todo:
            with dask.annotate(priority=-rank[chunk.number], retries=self.config.retries):
                shards.append(
                    dask.delayed(embed_chunk, pure=False)(
                        chunk, job_node, dask_key_name=f"embed-chunk-{chunk.number:06d}"
                    )
                )
        return dask.delayed(_assemble, pure=False)(
            shards,
            index_dir=job.index_dir,
            max_residues=self.config.max_residues,
            layers=self.config.layer_list(),
            output=str(self.output),
            staging=str(self.work_dir),
            attrs=self.attributes(),
            dtype=self.config.output_dtype,
            zarr_path=str(self.zarr) if self.zarr else None,
            dask_key_name="assemble-output",
        )

    def attributes(self) -> dict:
        """Attributes of the output file (netCDF-compatible values only)."""
        import distributed
        import esm
        import torch

        import virnuc_dask

        c = self.config
        versions = {
            "virnuc_dask": virnuc_dask.__version__,
            "torch": torch.__version__,
            "fair-esm": esm.__version__,
            "dask": dask.__version__,
            "distributed": distributed.__version__,
        }
        return {
            "model": c.model,
            "layers": np.array(c.layer_list(), dtype=np.int32),
            "pooling": POOLING,
            "compute_dtype": c.dtype,
            "max_residues": c.max_residues,
            "weights": self.weights.describe(),
            "random_weights": "yes" if self.weights.is_random else "no",
            "versions": json.dumps(versions),
            "inputs": json.dumps(self.index.inputs),
            "fingerprint": self.fingerprint,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def run(self, client, *, progress: bool = True, cleanup: bool = True) -> Path:
        """Register the model plugin on ``client``'s workers and compute the graph.

        Returns the output path. Shards stay in the work directory when the run fails, for
        ``resume``; the work directory is removed when it succeeds, unless ``cleanup`` is
        False (then :meth:`remove_work_dir` does it, e.g. after a cluster using it has closed).
        """
        from distributed import progress as progress_bar

        started = time.perf_counter()
        try:
            client.register_plugin(ModelPlugin(self.engine_settings), name=ModelPlugin.name)
            future = client.compute(self.graph())
            if progress:
                progress_bar(future)
            output, shards = future.result()
        except BaseException:
            logger.warning(
                "run stopped; finished chunks are kept in %s: rerun with --resume to reuse them",
                self.work_dir,
            )
            raise
        finally:
            self.release()
        if cleanup:
            self.remove_work_dir()
        self.report = RunReport.from_shards(output, shards, time.perf_counter() - started)
        logger.info(self.report.summary())
        return Path(output)

    def remove_work_dir(self) -> None:
        """Remove the work directory (after a successful run)."""
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def release(self) -> None:
        """Release the run's locks (done by :meth:`run`; call it for a job never run)."""
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()


@dataclass(frozen=True)
class RunReport:
    """What a finished run did: counts, time, and the tokens each worker embedded."""

    output: str
    sequences: int
    tokens: int
    chunks: int
    reused: int
    seconds: float
    worker_tokens: dict[str, int]

    @classmethod
    def from_shards(cls, output: str, shards: list[ShardInfo], seconds: float) -> RunReport:
        """Summarise the shards of a run."""
        per_worker: dict[str, int] = {}
        for shard in shards:
            per_worker[shard.worker] = per_worker.get(shard.worker, 0) + shard.tokens
        return cls(
            output=output,
            sequences=sum(s.sequences for s in shards),
            tokens=sum(s.tokens for s in shards),
            chunks=len(shards),
            reused=sum(s.worker == "resumed" for s in shards),
            seconds=seconds,
            worker_tokens=per_worker,
        )

    def summary(self) -> str:
        """One line for a person: sequences, tokens, time and throughput."""
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return (
            f"{self.sequences:,} sequences, {self.tokens:,} tokens in {self.chunks} chunks "
            f"({self.reused} reused) on {len(self.worker_tokens)} workers: "
            f"{self.seconds:.1f} s, {rate:,.0f} tokens/s"
        )


def _assemble(shards: list[ShardInfo], *, index_dir: str, **kwargs) -> tuple[str, list[ShardInfo]]:
    """The reduction task: read ids and lengths from the saved index, then assemble."""
    index = FastaIndex.load(index_dir)
    path = assemble(shards, ids=index.ids(), lengths=np.asarray(index.length), **kwargs)
    return path, shards


def _rank_in_lane(chunks: list[Chunk]) -> dict[int, int]:
    seen: dict[int, int] = {}
    rank = {}
    for chunk in chunks:
        rank[chunk.number] = seen.get(chunk.lane, 0)
        seen[chunk.lane] = rank[chunk.number] + 1
    return rank


def prepare(
    inputs: list[str | Path],
    output: str | Path,
    *,
    client=None,
    lanes: int | None = None,
    zarr: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    torch_threads: int | None = None,
    on_gpu: bool | None = None,
    **settings,
) -> EmbeddingJob:
    """Validate, index and partition on the driver; return the job, nothing computed yet.

    Parameters
    ----------
    inputs
        FASTA files, plain or gzip.
    output
        Final HDF5 path. Its folder must exist.
    client
        The cluster the job will run on: gives ``lanes`` and ``on_gpu`` when they are not set.
    lanes
        Workers the partition deals to; default: the client's worker count, else 1.
    zarr
        Also write a Zarr v3 store here.
    work_dir
        Work directory; default ``OUTPUT.work``.
    resume
        Reuse the shards of an earlier, interrupted run with the same fingerprint.
    torch_threads
        torch threads per worker (CPU workers).
    on_gpu
        Whether the workers have GPUs: resolves ``dtype="auto"`` to bf16 (else fp32);
        default: asked of the client's workers, else False.
    **settings
        Any field of :class:`~virnuc_dask.config.EmbedConfig`.
    """
    if lanes is None:
        lanes = max(1, len(client.scheduler_info(n_workers=-1)["workers"])) if client else 1
    if on_gpu is None:
        on_gpu = _has_gpus(client) if client else False
    config = EmbedConfig.from_settings(**settings)
    if config.dtype == "auto":
        config = dataclasses.replace(config, dtype="bf16" if on_gpu else "fp32")
    output = _check_output(Path(output), "output")
    zarr = _check_output(Path(zarr), "zarr output") if zarr else None
    work = Path(work_dir) if work_dir else output.with_name(output.name + ".work")
    weights = resolve_weights(
        config.model,
        checkpoint=config.checkpoint,
        random_weights=config.random_weights,
        seed=config.seed,
    )
    locks, saved = workdir.lock_and_open(output, work, resume)
    try:
        index = build_index(
            inputs,
            work / "staging",
            invalid_to_x=config.invalid_to_x,
            duplicate_ids=config.duplicate_ids,
        )
        fingerprint = workdir.fingerprint(index, weights, config)
        parts = workdir.saved_or_new_partition(work, saved, fingerprint, index, lanes, config)
        index.save(work / "index")
        reused = workdir.finished_shards(work, parts, fingerprint) if saved is not None else []
    except BaseException:
        for lock in reversed(locks):
            lock.release()
        if saved is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if saved is not None:
        logger.info(
            "resume: %d of %d chunks already finished and reused", len(reused), len(parts.chunks)
        )
    return EmbeddingJob(
        config,
        output,
        zarr,
        work,
        index,
        parts,
        weights,
        fingerprint,
        reused,
        torch_threads,
        locks=locks,
    )


def _check_output(path: Path, what: str) -> Path:
    path = path.expanduser().absolute()
    if not path.parent.is_dir():
        raise VirnucError(f"{what} folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise VirnucError(f"{what} folder {path.parent} is not writable")
    if path.is_dir() and what == "output":
        raise VirnucError(f"output {path} is a directory; give a file name such as out.h5")
    return path


def embed(
    inputs: list[str | Path] | str | Path,
    output: str | Path,
    *,
    client=None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    zarr: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    **settings,
) -> Path:
    """Embed every sequence of ``inputs`` with ESM-2 into one HDF5 file; return its path.

    Parameters
    ----------
    inputs
        FASTA file(s), plain or gzip.
    output
        The HDF5 file to write (its folder must exist).
    client
        A ``distributed.Client`` to run on; default: connect to ``scheduler`` /
        ``scheduler_file``, or start a local cluster that fits the machine.
    scheduler, scheduler_file
        An existing Dask scheduler to use instead of a local cluster.
    zarr
        Also write the same content as a Zarr v3 store.
    work_dir
        Work directory for shards; default ``OUTPUT.work``.
    resume
        Reuse the finished shards of an interrupted run.
    progress
        Show a progress bar.
    **settings
        Fields of :class:`~virnuc_dask.config.EmbedConfig`: ``model``, ``checkpoint``,
        ``random_weights``, ``seed``, ``layers``, ``dtype``, ``output_dtype``,
        ``max_residues``, ``tokens_per_batch``, ``chunk_tokens``, ``workers``,
        ``invalid_to_x``, ``duplicate_ids``, ``compile``, ``retries``.

    Examples
    --------
    >>> import virnuc_dask
    >>> path = virnuc_dask.embed("proteins.fasta", "proteins.h5",
    ...                          model="esm2_t6_8M_UR50D")  # doctest: +SKIP
    >>> virnuc_dask.open_embeddings(path).embedding.shape  # doctest: +SKIP
    (15, 320)
    """
    from virnuc_dask.cluster import connect, local_plan

    inputs = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    options = dict(zarr=zarr, work_dir=work_dir, resume=resume)
    if client is not None:
        job = prepare(inputs, output, client=client, **options, **settings)
        return job.run(client, progress=progress)
    if scheduler or scheduler_file:
        with connect(scheduler=scheduler, scheduler_file=scheduler_file) as (client, _):
            job = prepare(inputs, output, client=client, **options, **settings)
            return job.run(client, progress=progress)
    # A local cluster: index and validate first, so bad input fails before any worker starts.
    plan = local_plan(settings.get("workers"))
    job = prepare(
        inputs,
        output,
        lanes=plan.workers,
        torch_threads=plan.torch_threads,
        on_gpu=plan.gpus > 0,
        **options,
        **settings,
    )
    # The local workers keep their scratch space in the work directory, so the run writes
    # nothing outside it and the output; it goes once the cluster has closed.
    scratch = job.work_dir / "dask-scratch"
    with (
        dask.config.set({"temporary-directory": str(scratch)}),
        connect(workers=plan.workers, local_directory=scratch) as (client, info),
    ):
        if progress:
            print(f"Dask dashboard: {info.dashboard}", flush=True)
        path = job.run(client, progress=progress, cleanup=False)
    job.remove_work_dir()
    return path


def _has_gpus(client) -> bool:
    """Whether every worker of the cluster sees a CUDA device."""

    def cuda_available() -> bool:
        import torch

        return torch.cuda.is_available()

    answers = client.run(cuda_available)
    return bool(answers) and all(answers.values())
