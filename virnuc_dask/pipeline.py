"""The run: index, partition, a ``dask.delayed`` graph of chunk tasks and one assembly.

:func:`prepare` does everything that happens on the driver before the cluster computes
anything (validate settings and paths, index and validate the inputs, partition) and returns an
:class:`EmbeddingJob` whose :meth:`~EmbeddingJob.graph` is the unevaluated Dask graph: one
delayed ``embed_chunk`` per chunk and one delayed ``assemble`` over their results. In a notebook,
``job.graph().visualize()`` draws it; ``job.run(client)`` computes it. :func:`embed` does both
on a cluster that fits the machine.

Decisions:

- Every key of a run's graph carries a token unique to that graph
  (``embed-chunk-<token>-000001``): two runs on one scheduler never share (or return) each
  other's tasks, and a failed run's errored tasks never answer for the next run.
- :meth:`EmbeddingJob.run` keeps every chunk's future until the run ends, so the
  dashboard's Progress panel counts finished chunks (their results are tiny; a finished chunk
  whose worker is lost is run again by Dask and returns its shard on disk at once), and
  releases them when it ends; on failure or interrupt it cancels them first. A remote
  failure is raised again as a local error whose message names the chunk and its
  sequences, without the remote traceback objects.
- Work directory (default ``OUTPUT.work``, next to the output): the index, the partition, gzip
  inputs decompressed for seeking, and one shard per finished chunk. It is removed after a
  successful run, and after a failure that happened before the first shard was written (there
  is nothing to resume then); otherwise it is kept for ``resume``. It is removed *before* the
  locks are released, so no run can start using it while it is being deleted.
- With ``resume=True`` a run reuses the shards of an earlier run of the same inputs and
  settings (same fingerprint); without it an existing work directory is refused.
- Inputs, work directory and outputs may be fsspec URLs (:mod:`~virnuc_dask.storage`). With
  the work directory at a URL the driver keeps a local folder of its own (in ``TMPDIR``,
  marked and removed at the end): inputs that must be staged are staged there and uploaded
  to the work directory, the index is saved there and uploaded, and a local cluster keeps
  its scratch space there. Outputs at URLs are built locally and uploaded
  (:mod:`~virnuc_dask.output.remote`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import dask
import numpy as np
from dask.delayed import Delayed

from virnuc_dask import workdir
from virnuc_dask.config import EmbedConfig
from virnuc_dask.errors import Interrupted, VirnucError, option
from virnuc_dask.inputs import FastaIndex, index_inputs
from virnuc_dask.inputs.provenance import ReadProvenance, reads_summary
from virnuc_dask.model.checkpoint import resolve_weights
from virnuc_dask.model.registry import model_spec
from virnuc_dask.model.weights import WeightsSource
from virnuc_dask.output import (
    POOLING,
    ResidueLayout,
    ShardInfo,
    assemble,
    check_target,
    remove_stale_partials,
)
from virnuc_dask.output.remote import publish, shard_source, stand_ins
from virnuc_dask.plan import fingerprint as fingerprint_of_run
from virnuc_dask.plan.partition import Chunk, Partition
from virnuc_dask.plan.windows import WINDOWS_RULE, embedded_residues
from virnuc_dask.storage import ownership
from virnuc_dask.storage.locks import RunLock
from virnuc_dask.storage.paths import run_paths
from virnuc_dask.storage.remote import Remote, download_folder, place, upload_folder
from virnuc_dask.storage.urls import StorageOptions, is_url

if TYPE_CHECKING:
    from virnuc_dask.cluster.plugin import EngineSettings
    from virnuc_dask.cluster.task import ChunkJob

logger = logging.getLogger(__name__)

#: Tokens per worker from which a GPU run may compile its engine (``compile=None``), where the
#: worker lacks Triton for the fused kernels (which match the compiled layer's speed and need
#: no compile; see :mod:`virnuc_dask.engine.kernels`). Compiling ESM-2 3B costs about 10 s (a
#: few with torch's cache warm) and makes a plain torch engine about 25% faster: it pays back
#: from about 1-3 million tokens per worker; smaller jobs run eager.
COMPILE_MIN_TOKENS = 2_000_000
#: Seconds between the driver's checks on the scheduler and its workers while a run computes.
POLL_SECONDS = 2.0
#: A question to the scheduler that has no answer after this many seconds counts as unanswered.
ASK_SECONDS = 20.0


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
    token
        This job's token, in its locks and output attributes.
    overwrite
        Replace an existing output (only once the new one is complete).
    report
        What the run did, once :meth:`run` has finished.
    phases
        Seconds of the phases before the run (``index``; ``cluster_start`` from :func:`embed`).
    locks
        The output's and work directory's locks, held from :func:`prepare` until :meth:`run`
        ends (or :meth:`finish`).
    reads
        For a run on reads (``translate``): where each peptide comes from; else None.
    storage
        fsspec options for the URLs among the inputs, work directory and outputs.
    local_dir
        The driver's own folder when the work directory is a URL (staging, the outputs'
        local copies, a local cluster's scratch space); else None (the work directory).
    """

    config: EmbedConfig
    output: Path | Remote
    zarr: Path | Remote | None
    work_dir: Path | Remote
    index: FastaIndex
    partition: Partition
    weights: WeightsSource
    fingerprint: str
    reused: list[ShardInfo]
    torch_threads: int | None = None
    token: str = ""
    overwrite: bool = False
    report: RunReport | None = None
    #: What :meth:`finish` kept for resume: the work directory and its finished chunks.
    kept: tuple = (None, 0)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    locks: list[RunLock] = dataclasses.field(default_factory=list, repr=False)
    reads: ReadProvenance | None = None
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)
    local_dir: Path | None = None
    published: bool = dataclasses.field(default=False, repr=False)

    @property
    def local(self) -> Path:
        """The driver's local folder: the work directory, or its own when that is a URL."""
        return self.local_dir if self.local_dir is not None else self.work_dir

    @property
    def engine_settings(self) -> EngineSettings:
        """What each worker's :class:`~virnuc_dask.cluster.plugin.ModelPlugin` loads."""
        return _engine_settings(self.config, self.weights, self.torch_threads)

    @property
    def todo(self) -> list[Chunk]:
        """Chunks still to compute."""
        done = {s.chunk for s in self.reused}
        return [c for c in self.partition.chunks if c.number not in done]

    def graph(self) -> Delayed:
        """The unevaluated graph: one task per chunk still to do, one assembly over all.

        Each call names its keys with a new token (``embed-chunk-<token>-000001``), so graphs
        of different runs never share a key on a scheduler. Tasks are prioritised by their
        place in their lane, so the longest sequences of every lane run first and the run ends
        on short, quick chunks.
        """
        return self._graph(uuid.uuid4().hex[:12])[0]

    def chunk_job(self) -> ChunkJob:
        """What every chunk task of this job is given besides its chunk."""
        from virnuc_dask.cluster.task import ChunkJob

        return ChunkJob(
            index_dir=str(self.work_dir / "index"),
            order_path=str(self.work_dir / "order.npy"),
            shard_dir=str(self.work_dir / "shards"),
            fingerprint=self.fingerprint,
            output_dtype=self.config.output_dtype,
            engine=self.engine_settings,
            lock_path=str(self.work_dir / "lock"),
            token=self.token,
            width=model_spec(self.config.model).embed_dim,
            chunk_seconds=self.config.chunk_time_limit,
            storage=self.storage,
            per_residue=self.config.per_residue,
            residue_dtype=self.config.residue_dtype,
            long=self.config.long,
        )

    def _graph(self, key: str) -> tuple[Delayed, dict[str, Chunk], list[Delayed]]:
        """The graph named by ``key``: its assembly, its chunks by key, and the chunk tasks."""
        from virnuc_dask.cluster.task import embed_chunk

        job_node = dask.delayed(self.chunk_job(), name=f"virnuc-job-{key}")
        rank = _rank_in_lane(self.partition.chunks)
        keys, tasks = {}, []
        for chunk in self.todo:
            name = f"embed-chunk-{key}-{chunk.number:06d}"
            keys[name] = chunk
            with dask.annotate(priority=-rank[chunk.number], retries=self.config.retries):
                tasks.append(dask.delayed(embed_chunk)(chunk, job_node, dask_key_name=name))
        # The per-residue layout is rebuilt by the task from the saved index and partition
        # (16 bytes a sequence would otherwise travel through the scheduler).
        bounds = [(c.start, c.stop) for c in self.partition.chunks]
        final = dask.delayed(_assemble)(
            [*self.reused, *tasks],
            index_dir=str(self.work_dir / "index"),
            staging=str(self.work_dir),
            storage=self.storage,
            residue_plan=(
                (str(self.work_dir / "order.npy"), bounds, self.config.residue_dtype)
                if self.config.per_residue
                else None
            ),
            **self._output_settings(),
            dask_key_name=f"assemble-{key}",
        )
        return final, keys, tasks

    def _output_settings(self) -> dict:
        """What the output writer is given besides ids and lengths (graph and streaming alike)."""
        return dict(
            max_residues=self.config.max_residues,
            layers=self.config.layer_list(),
            width=model_spec(self.config.model).embed_dim,
            output=str(self.output),
            attrs=self.attributes(),
            dtype=self.config.output_dtype,
            fingerprint=self.fingerprint,
            zarr_path=str(self.zarr) if self.zarr else None,
            overwrite=self.overwrite,
            long=self.config.long,
        )

    def residue_layout(self) -> ResidueLayout | None:
        """Where each sequence's residues go in the output (None without ``per_residue``)."""
        if not self.config.per_residue:
            return None
        c = self.config
        counts = embedded_residues(np.asarray(self.index.length), c.max_residues, c.long)
        bounds = [(chunk.start, chunk.stop) for chunk in self.partition.chunks]
        return ResidueLayout.from_partition(counts, self.partition.order, bounds, c.residue_dtype)

    def attributes(self) -> dict:
        """Attributes of the output file (netCDF-compatible values only)."""
        from importlib import metadata

        import virnuc_dask

        c = self.config
        versions = {
            "virnuc_dask": virnuc_dask.__version__,
            **{name: metadata.version(name) for name in _VERSIONED},
        }
        return {
            "model": c.model,
            "layers": np.array(c.layer_list(), dtype=np.int32),
            "pooling": POOLING,
            "compute_dtype": c.dtype,
            "max_residues": c.max_residues,
            "long": c.long,
            **({"windows_rule": WINDOWS_RULE} if c.long == "window" else {}),
            "per_residue": "yes" if c.per_residue else "no",
            **({"residue_dtype": c.residue_dtype} if c.per_residue else {}),
            "weights": self.weights.describe(),
            "random_weights": "yes" if self.weights.is_random else "no",
            "versions": json.dumps(versions),
            # Where the inputs were, as the file will still say after it is moved or shared.
            "inputs": json.dumps([_absolute(p) for p in self.index.inputs]),
            "fingerprint": self.fingerprint,
            "run": self.token,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **(self.reads.attributes() if self.reads is not None else {}),
        }

    def read_variables(self) -> dict[str, np.ndarray] | None:
        """The output's provenance variables of a run on reads (None for proteins)."""
        if self.reads is None:
            return None
        return self.reads.variables(self.index.id_bytes, self.index.id_offsets)

    def run(self, client, *, progress: bool = True, cleanup: bool = True) -> Path:
        """Register the model plugin on ``client``'s workers and compute the graph.

        Returns the output path. When the run fails, its futures are cancelled and released,
        and the error is raised as a local exception naming the chunk and its sequences;
        finished shards stay in the work directory for ``resume``.

        Parameters
        ----------
        client
            A ``distributed.Client``.
        progress
            Show chunks and tokens done, rate and time left.
        cleanup
            Remove the work directory (after success, or after a failure before any shard)
            and release the locks when the run ends. With False the caller does it with
            :meth:`finish`, e.g. once a local cluster using the work directory has closed.
        """
        from distributed import span, wait

        from virnuc_dask.cluster.plugin import ModelPlugin, setup_stats
        from virnuc_dask.output import OutputWriter

        started = time.perf_counter()
        phases = dict(self.phases)
        futures, pending, writer, keys = [], set(), None, {}
        done, failure, interrupted = False, None, False
        # Progress (and the dashboard's link) from the start: the model load is worth watching.
        watch = _Watch(self, client, progress)
        try:
            clock = time.perf_counter()
            client.register_plugin(ModelPlugin(self.engine_settings), name=ModelPlugin.name)
            stats = client.run(setup_stats)
            compiling = max((s["compile_seconds"] for s in stats.values()), default=0.0)
            phases["model_load"] = time.perf_counter() - clock - compiling
            _log_load_detail(stats)
            phases["compile"] = compiling
            clock = time.perf_counter()
            _, keys, tasks = self._graph(uuid.uuid4().hex[:12])
            # The run's tasks under one named span: the dashboard shows its own metrics.
            with span(f"virnuc-dask {self.output.name}"):
                futures = client.compute(tasks)
            settings = self._output_settings()
            local_output, local_zarr, published = stand_ins(self.output, self.zarr, self.local)
            settings.update(output=str(local_output), zarr_path=local_zarr)
            writer = OutputWriter(
                ids=self.index.ids(),
                lengths=np.asarray(self.index.length),
                variables=self.read_variables(),
                residues=self.residue_layout(),
                **settings,
            )
            shards = list(self.reused)
            for shard in self.reused:
                _add_shard(writer, shard, self.storage)
            # Shards go into the output as their chunks finish, while the others compute: the
            # work left after the last chunk is checking the rows and renaming the file.
            pending = set(futures)
            while pending:
                try:
                    wait(list(pending), timeout=POLL_SECONDS, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    watch.check()
                    continue
                for future in [f for f in pending if f.done()]:
                    pending.discard(future)
                    # Kept until the run ends (its result is a few hundred bytes), so the
                    # dashboard counts it as done. Should its worker be lost, Dask runs it again,
                    # and the task returns the shard on disk at once (embed_chunk).
                    shard = future.result()
                    _add_shard(writer, shard, self.storage)
                    shards.append(shard)
                    watch.add(shard)
                watch.check()
            phases["compute"] = time.perf_counter() - clock
            clock = time.perf_counter()
            output = writer.close(extra_attrs={"phases": json.dumps(_rounded(phases))})
            if published:
                publish(published, overwrite=self.overwrite)
                self.published = True
                output = str(self.output)
            phases["assembly"] = time.perf_counter() - clock
            seconds = time.perf_counter() - started  # command to file: the summary's seconds
            watch.finish(seconds)  # the bar ends on the summary's rate
            done = True
        except KeyboardInterrupt:
            if not self._output_complete():
                client.cancel(futures, force=True)
                interrupted = True  # raised once finish() knows what is kept
            else:
                # The interrupt came after the output was renamed into place: the run is done.
                output, shards, done = str(self.output), [], True
                seconds = time.perf_counter() - started
        except Exception as error:
            client.cancel(futures, force=True)
            failure = _local_error(error, keys, self)
        finally:
            watch.close()
            if writer is not None and not done:
                writer.abort()
            for future in futures:
                future.release()
            futures = pending = []
            if cleanup:
                self.finish(success=done, interrupted=interrupted)
        if interrupted:
            raise Interrupted(*self.kept) if cleanup else KeyboardInterrupt
        if failure is not None:
            # Raised outside the handler: no remote traceback stays attached as the context.
            raise failure
        self.report = RunReport.from_shards(
            output, shards, seconds, phases=_rounded(phases), reads=self.reads
        )
        logger.info(self.report.summary())
        logger.debug("phases: %s", self.report.phase_line())
        return output if isinstance(self.output, Remote) else Path(output)

    def _output_complete(self) -> bool:
        """Whether this run's output is in place (its ``run`` attribute is this job's token)."""
        import h5py

        if isinstance(self.output, Remote) or isinstance(self.zarr, Remote):
            return self.published
        try:
            with h5py.File(self.output, "r") as f:
                ours = f.attrs.get("run") == self.token
        except OSError:
            return False
        return ours and (self.zarr is None or self.zarr.exists())

    def finish(self, *, success: bool, interrupted: bool = False) -> None:
        """Remove the work directory (after success, or when it holds no shard), then unlock.

        Called by :meth:`run`; call it yourself for a job never run or run with
        ``cleanup=False``. The work directory goes before the locks, so that no other run can
        take it while it is being removed. What is kept is recorded in :attr:`kept`, and said
        in a warning unless the run was ``interrupted`` (the raised
        :class:`~virnuc_dask.errors.Interrupted` says it then).
        """
        try:
            self.kept = (None, 0)
            if success:
                workdir.remove(self.work_dir)
            elif workdir.remove_if_unused(self.work_dir):
                logger.info("nothing finished yet: removed the work directory %s", self.work_dir)
            else:
                self.kept = (self.work_dir, workdir.finished_count(self.work_dir))
                # After an interrupt the raised Interrupted says it, once.
                (logger.debug if interrupted else logger.warning)(
                    "finished chunks are kept in %s: rerun with %s to reuse them",
                    self.work_dir,
                    option("resume"),
                )
        finally:
            try:
                if self.local_dir is not None:
                    ownership.remove(self.local_dir, LOCAL_FOLDER)
            finally:
                self.release()

    def release(self) -> None:
        """Release the run's locks (done by :meth:`finish`)."""
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()


#: The kind of the driver's own local folder, when the work directory is a URL.
LOCAL_FOLDER = "driver folder"


def _engine_settings(
    config: EmbedConfig, weights: WeightsSource, torch_threads: int | None
) -> EngineSettings:
    from virnuc_dask.cluster.plugin import EngineSettings

    return EngineSettings(
        weights=weights,
        dtype=config.dtype,
        layers=tuple(config.layer_list()),
        max_residues=config.max_residues,
        tokens_per_batch=config.tokens_per_batch,
        compile=config.compile,
        torch_threads=torch_threads,
    )


class EarlyCluster:
    """A local cluster started in a thread while the driver indexes, for :func:`embed`.

    :func:`prepare` calls :meth:`start` once the work directory is locked and the model's
    weights are checked (so usage errors still answer before any worker starts), and
    :meth:`close` if indexing fails, before it removes the work directory that holds the
    workers' scratch space. The workers start loading the model as they start (their
    preload), so a long index hides the cluster's start and the model's load. The thread
    only starts the cluster; the client is made in the driver's thread (:meth:`result`), since
    a Dask client belongs to the context that made it.

    Parameters
    ----------
    plan
        The local cluster's plan (:func:`~virnuc_dask.cluster.hardware.local_plan`).
    """

    def __init__(self, plan) -> None:
        self.plan = plan
        self.stack = contextlib.ExitStack()
        self.thread = None
        self.cluster = None
        self.error: Exception | None = None
        self.seconds = 0.0
        self.waited = 0.0

    def start(self, engine: EngineSettings, local: Path) -> None:
        """Start the cluster (scratch space in ``local``) in a background thread."""
        self.thread = threading.Thread(
            target=self._start, args=(engine, local), name="virnuc-dask-cluster-start"
        )
        self.thread.start()

    def _start(self, engine: EngineSettings, local: Path) -> None:
        from virnuc_dask.cluster.local import start_local_cluster

        clock = time.perf_counter()
        scratch = local / "dask-scratch"
        try:
            self.stack.enter_context(dask.config.set({"temporary-directory": str(scratch)}))
            self.cluster = start_local_cluster(self.plan, local_directory=scratch, engine=engine)
            self.stack.callback(self.cluster.close)  # if never attached (closing is idempotent)
        except Exception as error:  # raised again by result(), in the driver's thread
            self.error = error
        self.seconds = time.perf_counter() - clock

    def result(self) -> tuple:
        """Wait for the start; return ``(client, info)`` or raise why it failed."""
        from virnuc_dask.cluster.local import attach

        clock = time.perf_counter()
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise _cluster_failed(self.error) from self.error
        if self.cluster is None:
            raise RuntimeError("the cluster was never started")
        try:
            started = self.stack.enter_context(attach(self.cluster, self.plan))
        except Exception as error:
            raise _cluster_failed(error) from error
        self.waited = time.perf_counter() - clock
        logger.debug(
            "local cluster started in %.1f s, the driver waited %.1f s for it",
            self.seconds,
            self.waited,
        )
        return started

    def close(self) -> None:
        """Wait for a start under way, then close what it started."""
        if self.thread is not None:
            self.thread.join()
        self.stack.close()


#: Packages whose versions every output file records.
_VERSIONED = ("torch", "fair-esm", "dask", "distributed", "h5py", "xarray")


def _local_error(error: Exception, keys: dict[str, Chunk], job: EmbeddingJob) -> Exception:
    """The remote ``error`` as a local exception, naming the chunk and its sequences."""
    from distributed.scheduler import KilledWorker

    if isinstance(error, KilledWorker):
        found = re.search(r"embed-chunk-[0-9a-f]+-\d+", str(error))
        chunk = keys.get(found.group(0)) if found else None
        what = _chunk_words(job, chunk) if chunk else "a task of the run"
        limit = job.config.chunk_time_limit
        return VirnucError(
            f"{what} ended its worker several times: it ran past its time limit "
            f"({f'{limit:.0f} s' if limit else 'automatic'}; set {option('chunk_time_limit', 'S')}"
            f" to change it), or crashed the worker process (out of memory?). Finished chunks "
            f"are kept: rerun with {option('resume')}"
        )
    if isinstance(error, VirnucError):
        return type(error)(str(error))
    return RuntimeError(f"{type(error).__name__}: {error}")


def _chunk_words(job: EmbeddingJob, chunk: Chunk) -> str:
    rows = job.partition.order[chunk.start : chunk.stop]
    ids = job.index.ids(rows[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return f"chunk {chunk.number} ({len(rows)} sequences: {', '.join(ids)}{more})"


class _Watch:
    """What the driver does while a run computes: progress, and checks on the cluster.

    A cluster without workers, or a scheduler that stops answering, is reported at intervals;
    after the job's ``wait_limit`` seconds of either the run stops with a message.
    """

    def __init__(self, job: EmbeddingJob, client, progress: bool) -> None:
        from virnuc_dask.cluster.events import listen
        from virnuc_dask.run.progress import make_progress

        self.job, self.client = job, client
        self.chunks = len(job.reused)
        self.tokens = sum(s.tokens for s in job.reused)
        self.finished = {s.chunk for s in job.reused}
        # Tokens of the chunks still computing, from their workers' batch messages.
        self.partial: dict[int, int] = {}
        self.bar = (
            make_progress(
                len(job.partition.chunks),
                int(job.partition.lane_tokens().sum()),
                dashboard=client.dashboard_link,
            )
            if progress
            else None
        )
        if self.bar:
            listen(client, job.token, self._on_batch)
        self.trouble_since: float | None = None
        self.last_warning = 0.0
        self.last_check = time.monotonic()

    def _on_batch(self, message: dict) -> None:
        """A worker's message: ``tokens`` of chunk ``chunk`` are done (client's thread)."""
        chunk = message["chunk"]
        if chunk not in self.finished:
            self.partial[chunk] = max(self.partial.get(chunk, 0), message["tokens"])

    def add(self, shard: ShardInfo) -> None:
        """Count a finished chunk."""
        self.finished.add(shard.chunk)
        self.partial.pop(shard.chunk, None)
        self.chunks += 1
        self.tokens += shard.tokens

    def close(self) -> None:
        """Stop listening to the workers' progress messages."""
        if self.bar:
            from virnuc_dask.cluster.events import stop_listening

            stop_listening(self.client, self.job.token)

    def check(self) -> None:
        """Update the progress line; every few seconds ask the scheduler for its workers."""
        if self.bar:
            self.bar.update(self.chunks, self.tokens + sum(list(self.partial.values())))
        now = time.monotonic()
        limit = self.job.config.wait_limit
        if now - self.last_check < min(10 * POLL_SECONDS, limit / 2):
            return
        self.last_check = now
        address = self.client.scheduler.address
        try:
            workers = _count_workers(self.client, min(ASK_SECONDS, limit))
            trouble = None if workers else f"no workers are connected to the scheduler {address}"
        except TimeoutError:
            trouble = f"the scheduler at {address} does not answer"
        if trouble is None:
            self.trouble_since = None
            return
        self.trouble_since = self.trouble_since or now
        waited = now - self.trouble_since
        if waited > limit:
            raise VirnucError(
                f"{trouble} (for {waited:.0f} s); finished chunks are kept: start workers or "
                f"restart the scheduler, then rerun with {option('resume')}"
            )
        if now - self.last_warning > 30:
            self.last_warning = now
            logger.warning("%s (for %.0f s); waiting up to %.0f s", trouble, waited, limit)

    def finish(self, seconds: float) -> None:
        """Draw the final state of the progress line, with the run's ``seconds``."""
        if self.bar:
            self.bar.update(self.chunks, self.tokens, final=True, seconds=seconds)


def _count_workers(client, timeout: float) -> int:
    """Workers the scheduler knows now; ``TimeoutError`` when it does not answer in time."""

    async def ask():
        info = await asyncio.wait_for(client.scheduler.identity(n_workers=-1), timeout)
        return len(info.get("workers", {}))

    return client.sync(ask)


@dataclass(frozen=True)
class RunReport:
    """What a finished run did: counts, time, the tokens each worker embedded, phases.

    ``phases`` maps each step to its seconds on the driver's clock, in order: ``index``,
    ``cluster_start`` (a cluster :func:`embed` started), ``model_load`` (the workers' model
    plugin, less compiling), ``compile``, ``compute`` (first chunk submitted to last chunk
    written into the output), ``assembly`` (after the last chunk: checks and rename) and
    ``close`` (closing a cluster :func:`embed` started). The output file keeps the phases up
    to ``compute`` in its ``phases`` attribute (JSON).
    """

    output: str
    sequences: int
    tokens: int
    chunks: int
    reused: int
    seconds: float
    worker_tokens: dict[str, int]
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    #: A run on reads: reads read, reads without any kept frame, and the first of their ids.
    reads: int | None = None
    reads_without_peptides: int = 0
    reads_without_peptides_first: tuple[str, ...] = ()

    @classmethod
    def from_shards(
        cls,
        output: str,
        shards: list[ShardInfo],
        seconds: float,
        phases: dict[str, float] | None = None,
        reads: ReadProvenance | None = None,
    ) -> RunReport:
        """Summarise the shards of a run (and its reads, for a run on reads)."""
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
            phases=dict(phases or {}),
            reads=reads.reads if reads is not None else None,
            reads_without_peptides=reads.without_peptides if reads is not None else 0,
            reads_without_peptides_first=tuple(reads.first_without) if reads is not None else (),
        )

    def phase_line(self) -> str:
        """Where the time went, one line: ``index 0.1 s, cluster_start 3.0 s, ...``."""
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())

    def summary(self) -> str:
        """One line for a person: sequences, tokens, time and throughput."""
        from virnuc_dask.run.progress import rate

        embedded = sum(t for w, t in self.worker_tokens.items() if w != "resumed")
        speed = rate(embedded, self.seconds)
        workers = len(set(self.worker_tokens) - {"resumed", "existing"})
        line = (
            f"{self.sequences:,} sequences, {self.tokens:,} tokens in {self.chunks} chunks "
            f"({self.reused} reused) on {workers} worker{'s' if workers != 1 else ''}: "
            f"{self.seconds:.1f} s, {speed:,.0f} tokens/s"
        )
        if self.reads is not None:
            first = self.reads_without_peptides_first
            line += "; " + reads_summary(self.reads, self.reads_without_peptides, first)
        return line


def _assemble(
    shards: list[ShardInfo],
    *,
    index_dir: str,
    storage: StorageOptions | None = None,
    residue_plan=None,
    **kwargs,
) -> tuple[str, list[ShardInfo]]:
    """The reduction task: read ids and lengths from the saved index, then assemble.

    ``residue_plan`` (the saved order's path, the chunks' bounds and the residue dtype) gives
    the per-residue layout; None: pooled only. With a work directory or outputs at URLs, the
    index, the order and the shards are copied to a local temporary folder first, and the
    outputs built there and uploaded.
    """
    if not any(is_url(v) for v in (index_dir, kwargs["output"], kwargs.get("zarr_path"))):
        index = FastaIndex.load(index_dir)
        reads = ReadProvenance.load(index_dir)
        variables = reads.variables(index.id_bytes, index.id_offsets) if reads else None
        lengths = np.asarray(index.length)
        residues = None
        if residue_plan is not None:
            order_path, bounds, dtype = residue_plan
            counts = embedded_residues(lengths, kwargs["max_residues"], kwargs["long"])
            residues = ResidueLayout.from_partition(counts, np.load(order_path), bounds, dtype)
        path = assemble(
            shards,
            ids=index.ids(),
            lengths=lengths,
            variables=variables,
            residues=residues,
            **kwargs,
        )
        return path, shards
    with tempfile.TemporaryDirectory(prefix="virnuc-dask-assemble-") as folder:
        local = Path(folder)
        if is_url(index_dir):
            download_folder(Remote(index_dir, storage), local / "index")
            index_dir = str(local / "index")
        if residue_plan is not None and is_url(residue_plan[0]):
            Remote(residue_plan[0], storage).get(local / "order.npy")
            residue_plan = (str(local / "order.npy"), *residue_plan[1:])
        fetched = []
        for shard in shards:
            if is_url(shard.path):
                copy = local / "shards" / os.path.basename(shard.path)
                copy.parent.mkdir(exist_ok=True)
                Remote(shard.path, storage).get(copy)
                shard = dataclasses.replace(shard, path=str(copy))
            fetched.append(shard)
        output = place(kwargs["output"], storage)
        zarr = place(kwargs["zarr_path"], storage) if kwargs.get("zarr_path") else None
        local_output, local_zarr, published = stand_ins(output, zarr, local)
        kwargs.update(output=str(local_output), zarr_path=local_zarr)
        path, _ = _assemble(fetched, index_dir=index_dir, residue_plan=residue_plan, **kwargs)
        publish(published, overwrite=kwargs.get("overwrite", False))
    return str(output) if published else path, shards


def _add_shard(writer, shard: ShardInfo, storage: StorageOptions | None) -> None:
    """Copy a finished shard into the output, fetching it first when it is at a URL."""
    source = shard_source(shard.path, storage)
    try:
        writer.add(shard, source=source)
    finally:
        if not isinstance(source, str):
            source.close()


def _absolute(path: str) -> str:
    """A local input's absolute path; a URL, or ``-`` (standard input), as it is."""
    return path if path == "-" or is_url(path) else os.path.abspath(path)


def _rounded(phases: dict[str, float]) -> dict[str, float]:
    return {name: round(seconds, 3) for name, seconds in phases.items()}


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
    restart: bool = False,
    overwrite: bool = False,
    torch_threads: int | None = None,
    on_gpu: bool | None = None,
    storage_options: dict | str | StorageOptions | None = None,
    early: EarlyCluster | None = None,
    **settings,
) -> EmbeddingJob:
    """Validate, index and partition on the driver; return the job, nothing computed yet.

    Every path relation, the model's weights and the inputs are checked before anything is
    created; nothing is left behind when a check fails.

    Parameters
    ----------
    inputs
        FASTA files, plain or gzip; with ``translate``, reads (FASTA or FASTQ, plain or gzip).
        Any may be an fsspec URL (``s3://bucket/a.fa``, ``https://...``); ``-`` reads
        standard input.
    output
        Final HDF5 path (its folder must exist), or an object store's URL.
    client
        The cluster the job will run on: gives ``lanes`` and ``on_gpu`` when they are not set.
    lanes
        Workers the partition deals to; default: the client's worker count, else 1.
    zarr
        Also write a Zarr v3 store here.
    work_dir
        Work directory (must not exist yet, unless resuming); default ``OUTPUT.work``.
    resume
        Reuse the shards of an earlier, interrupted run with the same fingerprint. Shards of
        other settings are never discarded: that is refused, naming what differs.
    restart
        Discard the finished chunks an earlier run left in the work directory, and start
        over.
    overwrite
        Replace an existing output file (and Zarr store written by this tool); the old one
        stays intact until the new one is complete.
    torch_threads
        torch threads per worker (CPU workers).
    on_gpu
        Whether the workers have GPUs: resolves ``dtype="auto"`` to bf16 (else fp32);
        default: asked of the client's workers, else False.
    storage_options
        fsspec options for the URLs (credentials, ``endpoint_url``, ...): a dict, a JSON
        text or ``@FILE``; they reach the workers with the run's settings and are never
        logged or written into the work directory or the output.
    early
        A local cluster to start once the checks have passed, while the inputs are indexed
        (:func:`embed` passes one); closed here if indexing fails.
    **settings
        Any field of :class:`~virnuc_dask.config.EmbedConfig`.
    """
    config = EmbedConfig.from_settings(**settings)
    storage = StorageOptions.of(storage_options)
    inputs = [str(p) for p in inputs]
    paths = run_paths(output, zarr, work_dir, inputs, storage)
    check_target(paths.output, "output", overwrite=overwrite)
    if paths.zarr is not None:
        check_target(paths.zarr, "zarr store", overwrite=overwrite)
    weights = resolve_weights(
        config.model,
        checkpoint=config.checkpoint,
        random_weights=config.random_weights,
        seed=config.seed,
    )
    if lanes is None:
        lanes = max(1, len(client.scheduler_info(n_workers=-1)["workers"])) if client else 1
    if on_gpu is None:
        on_gpu = _has_gpus(client) if client else False
    if config.dtype == "auto":
        config = dataclasses.replace(config, dtype="bf16" if on_gpu else "fp32")
    token = uuid.uuid4().hex[:12]
    work = paths.work_dir
    clock = time.perf_counter()
    if resume and restart:
        raise VirnucError(f"{option('resume')} and {option('restart')} exclude each other")
    locks, saved = workdir.lock_and_open(paths.output, work, resume, token, restart=restart)
    local_dir = None
    try:
        for target in (paths.output, paths.zarr):
            if target is not None:
                for stale in remove_stale_partials(target):
                    logger.warning("removed %s, left by an assembly that was killed", stale)
        if isinstance(work, Remote):
            local_dir = Path(tempfile.gettempdir()) / f"virnuc-dask-{token}"
            ownership.claim(local_dir, LOCAL_FOLDER)
        local = local_dir if local_dir is not None else work
        if early is not None:
            # Built eager: whether this run compiles is known after indexing (the plugin
            # compiles it then, where the fused kernels are missing).
            settings = _engine_settings(config, weights, torch_threads)
            early.start(dataclasses.replace(settings, compile=config.compile or False), local)
        index, reads = index_inputs(inputs, local / "staging", config, storage)
        identity = fingerprint_of_run.identity(index, weights, config)
        fingerprint = fingerprint_of_run.fingerprint_of(identity)
        parts = workdir.saved_or_new_partition(
            work, saved, identity, index, lanes, config, restart=restart
        )
        index.save(local / "index")
        if reads is not None:
            reads.save(local / "index")
        if isinstance(work, Remote):
            _upload_index(index, local, work)
        reused = workdir.finished_shards(work, parts, fingerprint) if saved is not None else []
    except BaseException as error:
        try:
            if early is not None:
                early.close()  # its workers keep their scratch space in the work directory
            if saved is None:
                workdir.remove(work)
        finally:
            try:
                if local_dir is not None:
                    ownership.remove(local_dir, LOCAL_FOLDER)
            finally:
                for lock in reversed(locks):
                    lock.release()
        if isinstance(error, KeyboardInterrupt):
            kept = (None, 0) if saved is None else (work, workdir.finished_count(work))
            raise Interrupted(*kept) from None
        raise
    if saved is not None:
        logger.info(
            "resume: %d of %d chunks already finished and reused", len(reused), len(parts.chunks)
        )
    if config.compile is None:
        done = {s.chunk for s in reused}
        todo = sum(c.tokens for c in parts.chunks if c.number not in done)
        if not (on_gpu and todo >= COMPILE_MIN_TOKENS * lanes):
            # Small: never compile. Large: None, and each worker's engine decides (it compiles
            # only without Triton; the driver does not import torch to know).
            config = dataclasses.replace(config, compile=False)
    return EmbeddingJob(
        config,
        paths.output,
        paths.zarr,
        work,
        index,
        parts,
        weights,
        fingerprint,
        reused,
        torch_threads,
        token=token,
        overwrite=overwrite,
        phases={"index": time.perf_counter() - clock},
        locks=locks,
        reads=reads,
        storage=storage,
        local_dir=local_dir,
    )


def _upload_index(index: FastaIndex, local: Path, work: Remote) -> None:
    """Put the staged inputs and the saved index into a work directory at a URL.

    Staged files (gzip inputs, standard input, the peptides of reads) are read by the workers
    from the work directory's URL: the index names them there, saved again after the change.
    """
    staged = (local / "staging").resolve()
    for number, name in enumerate(index.files):
        path = Path(name).resolve()
        if not is_url(name) and staged in path.parents:
            target = work / "staging" / path.name
            target.put(path)
            index.files[number] = str(target)
    index.save(local / "index")
    upload_folder(local / "index", work / "index")


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
    restart: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict | str | StorageOptions | None = None,
    **settings,
) -> Path | str:
    """Embed every sequence of ``inputs`` with ESM-2 into one HDF5 file; return its path.

    Parameters
    ----------
    inputs
        FASTA file(s), plain or gzip; with ``translate="six-frame"``, nucleotide reads (FASTA
        or FASTQ, plain or gzip), whose peptides are embedded.
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
        Reuse the finished shards of an interrupted run (of the same inputs and settings).
    restart
        Discard the finished shards an earlier run left in the work directory.
    overwrite
        Replace an existing output (only once the new one is complete).
    progress
        Show progress.
    storage_options
        fsspec options for inputs, work directory and outputs given as URLs (``s3://``,
        ``gs://``, ``https://``): a dict, a JSON text or ``@FILE``. Credentials are best left
        to the standard places (``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, the environment).
    **settings
        Fields of :class:`~virnuc_dask.config.EmbedConfig`: ``model``, ``checkpoint``,
        ``random_weights``, ``seed``, ``layers``, ``dtype``, ``output_dtype``,
        ``max_residues``, ``tokens_per_batch``, ``chunk_tokens``, ``workers``,
        ``invalid_to_x``, ``as_protein``, ``duplicate_ids``, ``compile``, ``retries``,
        ``chunk_time_limit``, ``wait_limit``, ``per_residue``, ``residue_dtype``, ``long``;
        for nucleotide reads ``translate="six-frame"``
        with ``genetic_code``, ``frames``, ``min_peptide`` and ``split_bp``.

    Examples
    --------
    >>> import virnuc_dask
    >>> path = virnuc_dask.embed("proteins.fasta", "proteins.h5",
    ...                          model="esm2_t6_8M_UR50D")  # doctest: +SKIP
    >>> virnuc_dask.open_embeddings(path).embedding.shape  # doctest: +SKIP
    (15, 320)
    """
    from virnuc_dask.cluster.hardware import local_plan

    _refuse_inside_a_starting_worker()
    inputs = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    options = dict(
        zarr=zarr,
        work_dir=work_dir,
        resume=resume,
        restart=restart,
        overwrite=overwrite,
        storage_options=storage_options,
    )
    if client is not None:
        job = prepare(inputs, output, client=client, **options, **settings)
        return job.run(client, progress=progress)
    if scheduler or scheduler_file:
        from virnuc_dask.cluster.existing import connect

        clock = time.perf_counter()
        with connect(scheduler=scheduler, scheduler_file=scheduler_file) as (client, info):
            connected = time.perf_counter() - clock
            job = prepare(inputs, output, client=client, **options, **settings)
            job.phases = {"cluster_start": connected, **job.phases}
            return job.run(client, progress=progress)
    # A local cluster: check settings, paths and weights first, so usage errors answer before
    # any worker starts; then start the cluster while the inputs are indexed. The workers
    # keep their scratch space in the work directory, so the run writes nothing outside it
    # and the output; it goes once the cluster has closed.
    _refuse_an_unguarded_script()
    plan = local_plan(settings.get("workers") or dask.config.get("virnuc-dask.workers"))
    cluster = EarlyCluster(plan)
    # Small inputs are indexed first: a malformed record then answers at once, with no
    # cluster to start and close.
    early = _input_bytes(inputs) >= EARLY_START_BYTES
    job = prepare(
        inputs,
        output,
        lanes=plan.workers,
        torch_threads=plan.torch_threads,
        on_gpu=plan.gpus > 0,
        early=cluster if early else None,
        **options,
        **settings,
    )
    path, interrupted = None, False
    try:
        try:
            if not early:
                cluster.start(job.engine_settings, job.local)
            client, info = cluster.result()
            # What the driver waited for after indexing (all of the start, for small inputs).
            job.phases["cluster_start"] = cluster.waited
            path = job.run(client, progress=progress, cleanup=False)
        finally:
            clock = time.perf_counter()
            cluster.close()  # waits for a start under way: nothing outlives the run
        _closed(job, time.perf_counter() - clock)
    except KeyboardInterrupt:
        # Interrupted while the cluster closed, the output complete: the run succeeded.
        interrupted = path is None
    finally:
        job.finish(success=path is not None, interrupted=interrupted)
    if interrupted:
        raise Interrupted(*job.kept)
    return path


#: Inputs of at least this many bytes are indexed while the local cluster starts.
EARLY_START_BYTES = 4 * 2**20


def _input_bytes(inputs: list) -> float:
    """Bytes of the local input files; infinite when one is a URL or standard input."""
    total = 0
    for item in inputs:
        if is_url(str(item)) or str(item) == "-":
            return float("inf")
        with contextlib.suppress(OSError):  # prepare() names a missing file
            total += os.path.getsize(item)
    return total


def _log_load_detail(stats: dict[str, dict]) -> None:
    """Say (at DEBUG, shown by ``--verbose``) where each worker's model load went."""
    for worker, stat in sorted(stats.items()):
        if stat.get("detail"):
            steps = ", ".join(f"{k} {v:.1f} s" for k, v in stat["detail"].items())
            when = " (begun as the worker started)" if stat.get("early") else ""
            logger.debug("model load on %s%s: %s", worker, when, steps)


def _closed(job: EmbeddingJob, seconds: float) -> None:
    """Add the cluster's closing time to the job's report."""
    phases = {**job.report.phases, "close": round(seconds, 3)}
    job.report = dataclasses.replace(job.report, phases=phases)
    logger.debug("phases: %s", job.report.phase_line())


def _refuse_inside_a_starting_worker() -> None:
    """Refuse ``embed()`` in a worker process that is importing the user's script.

    Dask starts worker processes with the ``spawn`` method, which imports the main script
    again (as ``__mp_main__``). A script that calls ``embed()`` at top level, without
    ``if __name__ == "__main__":``, would start a run inside every starting worker.
    """
    # Under spawn the script is imported as __mp_main__ before the process knows its parent
    # (multiprocessing.parent_process() is still None then): the name alone tells.
    main = sys.modules.get("__main__")
    if getattr(main, "__name__", "") == "__mp_main__":
        raise VirnucError(_GUARD_HINT)


_GUARD_HINT = (
    "embed() was called while a Dask worker process was starting: the script that calls it "
    'has no `if __name__ == "__main__":` guard. Worker processes import the script again; put '
    'the call under `if __name__ == "__main__":`'
)


def _refuse_an_unguarded_script() -> None:
    """Stop a script that calls ``embed()`` at top level without a main guard, in one line.

    Such a script would start a local cluster whose worker processes import it again (Dask
    starts them with ``spawn``) and call ``embed()`` in turn. The call's line is looked up in
    the script's syntax tree before anything starts; the refusal is a ``SystemExit`` whose
    message is all the user sees (an exception would bury it under Dask's tracebacks).
    """
    found = _unguarded_call()
    if found is not None:
        script, line = found
        raise SystemExit(
            f"virnuc-dask: error: {script}, line {line}: embed() is called at the top level of "
            'the script without `if __name__ == "__main__":`; Dask\'s worker processes import '
            'the script again, so put the call under `if __name__ == "__main__":`'
        )


def _unguarded_call() -> tuple[str, int] | None:
    """The main script and the line of its top-level code that leads here, when that line is
    not under ``if __name__ == "__main__":`` (else None)."""
    import ast

    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    frame = next(
        (
            f
            for f in inspect.stack(context=0)
            if f.frame.f_globals is getattr(main, "__dict__", None) and f.function == "<module>"
        ),
        None,
    )
    if not script or frame is None:
        return None  # a notebook, an interactive session or python -c: nothing re-imported
    try:
        tree = ast.parse(Path(script).read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_guard(node.test):
            last = max(getattr(n, "end_lineno", 0) or 0 for n in node.body)
            if node.body[0].lineno <= frame.lineno <= last:
                return None
    return script, frame.lineno


def _is_main_guard(test: object) -> bool:
    """Whether an ``if`` test reads ``__name__ == "__main__"`` (either way round)."""
    import ast

    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    sides = [test.left, *test.comparators]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    texts = [s.value for s in sides if isinstance(s, ast.Constant)]
    return isinstance(test.ops[0], ast.Eq) and names == ["__name__"] and texts == ["__main__"]


def _cluster_failed(error: Exception) -> Exception:
    """Explain a local cluster that did not start, naming the unguarded-script case."""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    called_at_top = any(
        frame.frame.f_globals is getattr(main, "__dict__", None) and frame.function == "<module>"
        for frame in inspect.stack()
    )
    if script and called_at_top:
        return VirnucError(
            f"the local Dask cluster did not start ({type(error).__name__}: {error}). If "
            f"{script} calls embed() at top level, put the call under "
            '`if __name__ == "__main__":`: Dask worker processes import the script again'
        )
    return error


def _has_gpus(client) -> bool:
    """Whether every worker of the cluster sees a CUDA device."""

    def cuda_available() -> bool:
        import torch

        return torch.cuda.is_available()

    answers = client.run(cuda_available)
    return bool(answers) and all(answers.values())
