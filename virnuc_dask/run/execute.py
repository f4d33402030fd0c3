"""Executing a run: its graph on a cluster, the output built as the chunks finish.

:func:`execute` registers the model plugin, computes the graph's chunk tasks and feeds each
finished shard into the run's :class:`~virnuc_dask.output.assembly.Assembly` while the others
compute, watching the cluster meanwhile (:class:`_Watch`: progress, a scheduler that stops
answering, a cluster without workers).

Decisions:

- Every chunk's future is kept until the run ends, so the dashboard's Progress panel counts
  finished chunks (their results are tiny; a finished chunk whose worker is lost is run again
  by Dask and returns its shard on disk at once), and released when it ends; on failure or
  interrupt they are cancelled first. A remote failure is raised again as a local error whose
  message names the chunk and its sequences, without the remote traceback objects
  (:mod:`~virnuc_dask.run.messages`).
- The run's tasks are computed under one named span, so the dashboard shows its metrics.
- An interrupt that comes after the output was renamed into place ends a run that succeeded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from virnuc_dask.errors import Interrupted, VirnucError, option
from virnuc_dask.run.messages import local_error
from virnuc_dask.run.report import RunReport
from virnuc_dask.storage.urls import is_url

if TYPE_CHECKING:
    from virnuc_dask.output.shards import ShardInfo
    from virnuc_dask.run.job import EmbeddingJob

logger = logging.getLogger(__name__)


#: Seconds between the driver's checks on the scheduler and its workers while a run computes.
POLL_SECONDS = 2.0


#: A question to the scheduler that has no answer after this many seconds counts as unanswered.
ASK_SECONDS = 20.0


class _Watch:
    """What the driver does while a run computes: progress, and checks on the cluster.

    A cluster without workers, or a scheduler that stops answering, is reported at intervals;
    after the job's ``wait_limit`` seconds of either the run stops with a message.
    """

    def __init__(self, job: EmbeddingJob, client, progress: bool, scaler=None) -> None:
        from virnuc_dask.cluster.events import listen
        from virnuc_dask.run.progress import make_progress

        self.job, self.client, self.scaler = job, client, scaler
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
            # The first state now: the reused chunks' tokens, which the rate leaves out.
            self.bar.update(self.chunks, self.tokens)
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
        note = None
        if self.scaler is not None:
            note = self.scaler.check(len(self.job.partition.chunks) - len(self.finished))
        if self.bar:
            done = self.tokens + sum(list(self.partial.values()))
            self.bar.update(self.chunks, done, note=note)
        now = time.monotonic()
        limit = self.job.config.wait_limit
        if now - self.last_check < min(10 * POLL_SECONDS, limit / 2):
            return
        self.last_check = now
        address = self.client.scheduler.address
        try:
            workers = _count_workers(self.client, min(ASK_SECONDS, limit))
            trouble = None if workers else f"no workers are connected to the scheduler {address}"
            if not workers and self.scaler is not None and self.scaler.pending:
                trouble = None  # worker jobs waiting in the batch queue: said on the line
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


def _rounded(phases: dict[str, float]) -> dict[str, float]:
    return {name: round(seconds, 3) for name, seconds in phases.items()}


def _log_load_detail(stats: dict[str, dict]) -> None:
    """Say (at DEBUG, shown by ``--verbose``) where each worker's model load went."""
    for worker, stat in sorted(stats.items()):
        if stat.get("detail"):
            steps = ", ".join(f"{k} {v:.1f} s" for k, v in stat["detail"].items())
            when = " (begun as the worker started)" if stat.get("early") else ""
            logger.debug("model load on %s%s: %s", worker, when, steps)


class _Unwatched:
    """The watch of a run with nothing to compute (no cluster): nothing to show or check."""

    def add(self, shard: ShardInfo) -> None:
        """Nothing to count."""

    def check(self) -> None:
        """Nothing to check."""

    def close(self) -> None:
        """Nothing to stop."""

    def finish(self, seconds: float) -> None:
        """Nothing to draw."""


def execute(
    job, client, graph, *, progress: bool = True, cleanup: bool = True, scaler=None
) -> Path | str:
    """Compute ``graph`` of ``job`` on ``client``, building the output as its chunks finish.

    See :meth:`~virnuc_dask.run.job.EmbeddingJob.run`, which calls it. A graph without chunk
    tasks (every chunk resumed, every sequence in the embedding cache) is assembled without
    the cluster: no model is loaded, and ``client`` may be None. ``scaler`` (a
    :class:`~virnuc_dask.cluster.slurm.SlurmWorkers`) is told the chunks left at every check
    and says what the progress line adds (workers pending in a batch queue).
    """
    from distributed import span, wait

    from virnuc_dask.cluster.plugin import ModelPlugin, setup_stats

    if client is None and graph.tasks:
        raise ValueError(f"{len(graph.tasks)} chunks to compute, and no client to compute them")
    started = time.perf_counter()
    phases = dict(job.phases)
    futures, pending, assembly = [], set(), None
    done, failure, interrupted = False, None, False
    # Progress (and the dashboard's link) from the start: the model load is worth watching.
    watch = _Watch(job, client, progress, scaler) if graph.tasks else _Unwatched()
    try:
        clock = time.perf_counter()
        if graph.tasks:
            client.register_plugin(ModelPlugin(job.engine_settings), name=ModelPlugin.name)
            stats = client.run(setup_stats)
            compiling = max((s["compile_seconds"] for s in stats.values()), default=0.0)
            phases["model_load"] = time.perf_counter() - clock - compiling
            _log_load_detail(stats)
            phases["compile"] = compiling
            clock = time.perf_counter()
            # The run's tasks under one named span: the dashboard shows its own metrics.
            with span(f"virnuc-dask {job.output.name}"):
                futures = client.compute(graph.tasks)
        assembly = job.assembly()
        shards = list(graph.reused)
        for shard in graph.reused:
            assembly.add(shard)
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
                assembly.add(shard)
                shards.append(shard)
                watch.add(shard)
            watch.check()
        phases["compute"] = time.perf_counter() - clock
        clock = time.perf_counter()
        output = assembly.close(extra_attrs={"phases": json.dumps(_rounded(phases))})
        job.published = assembly.published
        phases["assembly"] = time.perf_counter() - clock
        seconds = time.perf_counter() - started  # command to file: the summary's seconds
        watch.finish(seconds)  # the bar ends on the summary's rate
        done = True
    except KeyboardInterrupt:
        if not job._output_complete():
            if futures:
                client.cancel(futures, force=True)
            interrupted = True  # raised once finish() knows what is kept
        else:
            # The interrupt came after the output was renamed into place: the run is done.
            output, shards, done = str(job.output), [], True
            seconds = time.perf_counter() - started
    except Exception as error:
        if futures:
            client.cancel(futures, force=True)
        failure = local_error(error, graph.chunks, job)
    finally:
        watch.close()
        if assembly is not None and not done:
            assembly.abort()
        for future in futures:
            future.release()
        futures = pending = []
        if cleanup:
            job.finish(success=done, interrupted=interrupted)
    if interrupted:
        raise Interrupted(*job.kept) if cleanup else KeyboardInterrupt
    if failure is not None:
        # Raised outside the handler: no remote traceback stays attached as the context.
        raise failure
    job.report = RunReport.from_shards(
        output,
        shards,
        seconds,
        phases=_rounded(phases),
        reads=job.reads,
        sequences=len(job.index),
        distinct=job.distinct,
        cached=job.cached,
    )
    logger.info(job.report.summary())
    logger.debug("phases: %s", job.report.phase_line())
    return output if is_url(str(job.output)) else Path(output)
