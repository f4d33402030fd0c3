"""Workers as Slurm jobs, through dask-jobqueue: ``--cluster slurm``, ``embed(cluster="slurm")``.

The driver runs Dask's scheduler in its own process (dask-jobqueue's ``SLURMCluster``) and
submits worker jobs with ``sbatch``: one worker per GPU of a job (``dask cuda worker``, the job
asking ``--gres=gpu:N``), or one CPU worker a job where no GPU is asked. The number of
workers follows the run (:class:`ChunkAdaptive`): as many as the chunks left, at most
``jobs`` jobs, fewer as the last chunks run; every job is cancelled when the run ends, fails or
is interrupted (:func:`slurm_workers`).

Settings, in the order they win: the call's ``slurm={...}`` (or the ``--slurm-*`` flags), then
``virnuc-dask.slurm`` in Dask's configuration, then dask-jobqueue's own ``jobqueue.slurm``
section (``~/.config/dask/jobqueue.yaml``: ``queue``, ``account``, ``walltime``,
``interface``, ``job-extra-directives``, ``scheduler-options``, ``log-directory``, ...), which
the users of dask-jobqueue already keep. :class:`SlurmSettings`.

Decisions:

- The job is checked with ``sbatch --test-only`` before anything is created: a partition that
  does not exist, more memory or GPUs than a node has, a walltime over the partition's limit
  are refused by Slurm there, and the run stops with Slurm's own words in one line (exit 2),
  no job submitted. Without the check dask-jobqueue submits in the background, and a refused
  job would only be logged, again at every scaling attempt.
- Scaling is Dask's :class:`~distributed.deploy.Adaptive` with one change, its target: the
  chunks not yet finished (at most ``jobs`` times the workers a job holds), not the
  scheduler's estimate of the work, which knows nothing of a task's length before the first
  one ends and would start with one worker. Dask's machinery does the rest: it submits up to
  the target, closes only idle workers when the target falls (pending jobs first), after three
  consecutive checks, by retiring them, and submits again a job that ended (walltime,
  preemption, ``scancel``): the chunk it was computing is computed again elsewhere, the
  finished ones stay on disk.
- Jobs waiting in the queue are not a cluster without workers: the run waits for them without
  the ``wait_limit`` (queues can be long), and the progress line says how many workers are
  pending, for how long and why (Slurm's reason, from ``squeue`` every 10 s).
- Every job is cancelled at the end: dask-jobqueue closes the cluster (retiring the workers,
  then ``scancel``), and a last ``scancel`` takes any job this run submitted that is still in
  the queue (a close cut short). A driver killed outright leaves its jobs to end by
  themselves: a worker that cannot reach its scheduler exits after dask-jobqueue's
  ``death-timeout`` (60 s).
- The workers' logs go to the work directory (``slurm/``, kept with it after a failure) unless
  ``jobqueue.slurm.log-directory`` says otherwise, or the work directory is a URL.
- Workers get the model by the run's plugin as they join, not by an early preload: a job may
  start long after the driver, and the early load's preload text cannot travel in a job
  script.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask.config
from distributed.deploy import Adaptive

import virnuc_dask.config  # noqa: F401 (the virnuc-dask defaults, registered with Dask)
from virnuc_dask.errors import VirnucError, option

logger = logging.getLogger(__name__)


#: Seconds between the driver's questions to ``squeue`` about its jobs.
SQUEUE_SECONDS = 10.0

#: Seconds a ``sbatch --test-only``, ``squeue`` or ``scancel`` may take.
COMMAND_SECONDS = 30.0

#: The job name in ``squeue`` (unless ``jobqueue.slurm.name`` is changed from its default).
JOB_NAME = "virnuc-dask"

# Defaults where neither virnuc-dask.slurm nor jobqueue.slurm says: per GPU, or a CPU job.
_CORES_PER_GPU, _CPU_JOB_CORES = 8, 1
_MEMORY_PER_GPU_GB, _CPU_JOB_MEMORY = 32, "4GB"


@dataclass(frozen=True)
class SlurmSettings:
    """The worker jobs of a ``--cluster slurm`` run.

    Parameters
    ----------
    jobs
        Worker jobs at most at once (fewer when the run has fewer chunks).
    gpus_per_job
        GPUs each job asks for (``--gres=gpu:N``), one worker each; 0: one CPU worker a job.
    cores
        CPU cores of a job (``--cpus-per-task``); default ``jobqueue.slurm.cores``, else 8 a
        GPU, or 1 for a CPU job. A CPU worker computes with all of them.
    memory
        Memory of a job (``--mem``); default ``jobqueue.slurm.memory``, else 32 GB a GPU, or
        4 GB for a CPU job.
    partition, account, walltime
        ``-p``, ``-A``, ``-t``; default ``jobqueue.slurm.queue``, ``.account``, ``.walltime``.
    job_extra
        More ``#SBATCH`` options (``--qos=high``), after ``jobqueue.slurm.job-extra-directives``.
    """

    jobs: int = 4
    gpus_per_job: int = 1
    cores: int | None = None
    memory: str | None = None
    partition: str | None = None
    account: str | None = None
    walltime: str | None = None
    job_extra: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, given: dict | None = None) -> SlurmSettings:
        """``given`` (names with ``_``) over ``virnuc-dask.slurm``; None falls back; checked."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in (given or {}).items() if v is not None}
        unknown = set(given) - names
        if unknown:
            raise TypeError(f"unknown Slurm settings: {', '.join(sorted(unknown))}")
        configured = dask.config.get("virnuc-dask.slurm") or {}
        values = {name: configured.get(name.replace("_", "-")) for name in names}
        values = {k: v for k, v in values.items() if v is not None}
        values.update(given)
        values["job_extra"] = tuple(values.get("job_extra") or ())
        settings = cls(**values)
        if settings.jobs < 1:
            raise VirnucError(f"{option('slurm_jobs', settings.jobs)}: at least one worker job")
        if settings.gpus_per_job < 0:
            raise VirnucError(f"{option('slurm_gpus', settings.gpus_per_job)}: 0 or more GPUs")
        if settings.cores is not None and settings.cores < 1:
            raise VirnucError(f"{option('slurm_cores', settings.cores)}: at least one core")
        return settings

    @property
    def workers_per_job(self) -> int:
        """Dask workers in one job: one per GPU, or one CPU worker."""
        return max(1, self.gpus_per_job)

    @property
    def max_workers(self) -> int:
        """Workers of all the jobs at once: the lanes the partition deals to."""
        return self.jobs * self.workers_per_job

    @property
    def job_cores(self) -> int:
        """CPU cores of a job."""
        configured = dask.config.get("jobqueue.slurm.cores", None)
        default = _CORES_PER_GPU * self.gpus_per_job if self.gpus_per_job else _CPU_JOB_CORES
        return int(self.cores or configured or default)

    @property
    def torch_threads(self) -> int | None:
        """torch threads of a CPU worker (all of its job's cores); None for GPU workers."""
        return None if self.gpus_per_job else self.job_cores

    def cluster_arguments(self, log_directory: Path | None) -> dict:
        """Keyword arguments of dask-jobqueue's ``SLURMCluster`` (and ``SLURMJob``).

        Only what these settings decide; the rest comes from ``jobqueue.slurm``. Each worker
        runs one thread (one chunk at a time): dask-jobqueue's ``cores`` is the job's worker
        count, and the job's CPUs are asked with ``job_cpu``.
        """
        memory = self.memory or dask.config.get("jobqueue.slurm.memory", None)
        if memory is None:
            memory = (
                f"{_MEMORY_PER_GPU_GB * self.gpus_per_job}GB"
                if self.gpus_per_job
                else _CPU_JOB_MEMORY
            )
        extra = list(dask.config.get("jobqueue.slurm.job-extra-directives", None) or [])
        if self.gpus_per_job:
            extra.append(f"--gres=gpu:{self.gpus_per_job}")
        extra.extend(self.job_extra)
        arguments = {
            "cores": self.workers_per_job,
            "processes": self.workers_per_job,
            "job_cpu": self.job_cores,
            "memory": memory,
            "job_extra_directives": extra,
        }
        if self.gpus_per_job:
            arguments["worker_command"] = "dask_cuda.cli"  # dask cuda worker: one per GPU
        for name, value in (
            ("queue", self.partition),
            ("account", self.account),
            ("walltime", self.walltime),
        ):
            if value is not None:
                arguments[name] = value
        if dask.config.get("jobqueue.slurm.name", None) in (None, "dask-worker"):
            arguments["job_name"] = JOB_NAME
        if log_directory is not None and not dask.config.get("jobqueue.slurm.log-directory", None):
            arguments["log_directory"] = str(log_directory)
        return arguments


def jobqueue():
    """dask-jobqueue's ``SLURMCluster`` and ``SLURMJob``; a clear error where it is missing."""
    # dask-jobqueue 0.9.0 sets SIGINT to ``sys.exit()`` when imported (for its runners;
    # dask/dask-jobqueue#696, fixed after 0.9.0): Ctrl-C would end the run with status 0 and
    # no word of what was kept. The handler in place before the import is put back.
    interrupt = signal.getsignal(signal.SIGINT)
    try:
        from dask_jobqueue.slurm import SLURMCluster, SLURMJob
    except ImportError:
        raise VirnucError(
            f"{option('cluster', 'slurm')} needs dask-jobqueue: pip install 'virnuc-dask[slurm]'"
        ) from None
    finally:
        if interrupt is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, interrupt)
    return SLURMCluster, SLURMJob


def check_jobs(settings: SlurmSettings) -> None:
    """Ask Slurm whether it would run one worker job (``sbatch --test-only``), submitting none.

    Raises
    ------
    VirnucError
        ``sbatch`` is missing, or Slurm refuses the job (its reason, in one line).
    """
    _, SLURMJob = jobqueue()
    if shutil.which("sbatch") is None:
        raise VirnucError(
            f"{option('cluster', 'slurm')} submits jobs with sbatch, which is not on this "
            "machine's PATH: run it where the Slurm commands are (a login node)"
        )
    job = SLURMJob(
        scheduler="tcp://127.0.0.1:8786", name="check", **settings.cluster_arguments(None)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="virnuc-dask-") as script:
        script.write(job.job_script())
        script.flush()
        done = _command(["sbatch", "--test-only", script.name])
    if done.returncode != 0:
        said = "; ".join(
            line.removeprefix("sbatch: ").removeprefix("error: ").strip()
            for line in done.stderr.splitlines()
            if line.strip()
        )
        raise VirnucError(
            f"Slurm refuses the worker jobs: {said or f'sbatch exited {done.returncode}'} "
            f"(check {option('slurm_partition', 'P')}, {option('slurm_memory', 'M')}, "
            f"{option('slurm_cores', 'N')}, {option('slurm_gpus', 'N')}, "
            f"{option('slurm_walltime', 'T')} and jobqueue.slurm in your Dask configuration)"
        )


class ChunkAdaptive(Adaptive):
    """Dask's adaptive scaling, its target the run's chunks still to finish.

    Parameters
    ----------
    cluster
        The ``SLURMCluster``.
    remaining
        Called on the cluster's event loop: how many chunks are not finished yet.
    **kwargs
        :class:`~distributed.deploy.Adaptive`'s (``minimum``, ``maximum``, ``interval``, ...).
    """

    def __init__(self, cluster, *, remaining, **kwargs) -> None:
        self.remaining = remaining
        super().__init__(cluster, **kwargs)

    async def target(self) -> int:
        """Workers wanted: one per chunk left (Adaptive keeps it within the maximum)."""
        return self.remaining()


class SlurmWorkers:
    """The run's worker jobs: their scaling to the chunks left, their state, their end.

    The run's watch calls :meth:`check` every few seconds with the chunks left; it returns
    what the progress line says of jobs still pending.
    """

    def __init__(self, cluster, chunks: int, workers_per_job: int = 1) -> None:
        self.cluster = cluster
        self.workers_per_job = workers_per_job
        self.remaining = chunks
        self.pending = 0
        self.submitted: set[str] = set()
        self._pending_since: dict[str, float] = {}
        self._reason = ""
        self._asked = -math.inf

    def check(self, remaining: int) -> str | None:
        """Set the chunks left (the scaling's target); say what is pending, if anything."""
        self.remaining = remaining
        now = time.monotonic()
        if now - self._asked >= SQUEUE_SECONDS:
            self._asked = now
            self._ask_squeue(now)
        if not self.pending:
            return None
        waited = now - min(self._pending_since.values(), default=now)
        workers = self.pending * self.workers_per_job
        reason = f" ({self._reason})" if self._reason else ""
        return (
            f"{workers} worker{'s' if workers != 1 else ''} pending in Slurm's queue for "
            f"{waited:.0f} s{reason}"
        )

    def job_ids(self) -> list[str]:
        """Ids of the jobs the cluster holds now (each one also noted as submitted)."""
        ids = [
            str(job.job_id)
            for job in list(self.cluster.workers.values())
            if getattr(job, "job_id", None)
        ]
        self.submitted.update(ids)
        return ids

    def _ask_squeue(self, now: float) -> None:
        ids = self.job_ids()
        states = queued(ids) if ids else {}
        pending = {i: reason for i, (state, reason) in states.items() if state == "PENDING"}
        self._pending_since = {i: self._pending_since.get(i, now) for i in pending}
        self.pending = len(pending)
        reasons = sorted({r for r in pending.values() if r and r != "None"})
        self._reason = ", ".join(reasons)

    def cancel_left(self) -> None:
        """``scancel`` every job this run submitted that is still in the queue."""
        left = sorted(queued(sorted(self.submitted)))
        if left:
            logger.debug("cancelling Slurm jobs left after the cluster closed: %s", left)
            _command(["scancel", *left])


def queued(ids: list[str]) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` of the jobs of ``ids`` still in ``squeue``."""
    if not ids:
        return {}
    done = _command(["squeue", "--noheader", f"--jobs={','.join(ids)}", "--format=%i|%T|%r"])
    found = {}
    for line in done.stdout.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job:
            found[job] = (state, reason)
    return found


def _command(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_SECONDS)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 1, "", f"{command[0]} did not answer")


@contextlib.contextmanager
def slurm_workers(settings: SlurmSettings, chunks: int, log_directory: Path | None) -> Iterator:
    """Yield ``(client, workers)``: a client of a ``SLURMCluster`` scaling to ``chunks``.

    The scheduler runs in this process; worker jobs are submitted as the scaling asks.
    Leaving closes the client and the cluster (every job cancelled), then cancels whatever
    this run submitted that is still queued.
    """
    from distributed import Client

    SLURMCluster, _ = jobqueue()
    if log_directory is not None:
        log_directory.mkdir(parents=True, exist_ok=True)
    cluster = SLURMCluster(**settings.cluster_arguments(log_directory))
    workers = SlurmWorkers(cluster, chunks, settings.workers_per_job)
    try:
        cluster.adapt(
            Adaptive=ChunkAdaptive,
            minimum=0,
            maximum=settings.max_workers,
            remaining=lambda: workers.remaining,
        )
        with Client(cluster) as client:
            yield client, workers
    finally:
        try:
            workers.job_ids()  # noted before the close forgets them
            cluster.close()
        finally:
            workers.cancel_left()
