"""One Slurm allocation as the cluster: ``srun virnuc-dask embed ... --cluster slurm-allocation``.

Every task of the ``srun`` step runs the same command. Rank 0 (``SLURM_PROCID=0``) is the Dask
scheduler and the driver: it indexes, partitions, runs the graph and assembles the output, as
a run on any cluster does. Every other rank is a worker: a ``dask_cuda.CUDAWorker`` (one
worker per GPU of the task) where the task sees GPUs and dask-cuda is installed, else one
``distributed.Nanny`` worker with one thread.

Decisions:

- Our own small runner, not dask-jobqueue's ``SLURMRunner``: that one makes rank 0 the
  scheduler only and rank 1 the client, installs a SIGINT handler when imported and ends its
  ranks by signalling itself. Here the driver lives with the scheduler on rank 0, so that
  every other rank is a worker and the driver's files (output, work directory) are written
  where the step was started.
- Only the step's own tasks take part: a command outside an ``srun`` step (no
  ``SLURM_STEP_ID``, as in the batch script itself, or no ``SLURM_PROCID``) is refused naming
  ``srun``, and so is a step of one task (it has no worker). Every rank checks the same
  variables, so every rank refuses alike.
- Rank 0 starts its scheduler before it reads anything else (settings, inputs, weights): from
  then on, whatever ends rank 0 closes the scheduler, and closing it ends every worker.
- The scheduler listens on ``virnuc-dask.allocation.host`` when set, else on the address of
  ``virnuc-dask.allocation.interface`` (``ib0``: the network the nodes share), else on the
  address the node's name resolves to, unless that is a loopback address (Debian maps the
  name to 127.0.1.1), else on the address of the interface of the default route
  (distributed's ``get_ip``). Never 127.0.0.1 by default: other nodes must reach it. Its port
  is chosen free (two steps may share a node); the dashboard takes 8787, or a free port when
  that is taken, on the same address, and the run prints its link.
- The scheduler file is Dask's (``address``, ``id``, ``services``: ``dask worker
  --scheduler-file`` and ``virnuc-dask embed --scheduler-file`` read it) plus the step it
  belongs to (``slurm-step``: ``JOB.STEP``). It is written whole (a temporary name, then a
  rename), and worker ranks follow only a file of their own step: a file an earlier step left
  at a given ``--scheduler-file`` is never followed, and rank 0 replaces it (one of the same
  step name, a job number used again, may be read before that: a worker rank whose file
  comes to name another address of its step follows it). A file there that is not a
  scheduler file is refused by every rank. Default: in the current folder (srun's tasks
  share the submit folder), named for the job and the step. Rank 0 removes it at the end,
  whatever the end, unless it is killed outright.
- Rank 0 waits for the workers of every other rank before it prepares the run, so that the
  partition deals to all of them; a message says who is missing every 10 s. After
  ``wait_limit`` seconds it goes on with the ranks that came (a warning names the others) or,
  with none, stops. Workers are named ``slurm-rank-N`` (``-I`` added per GPU by dask-cuda).
- Torch threads of a CPU worker are the task's CPUs (``SLURM_CPUS_PER_TASK``, else 1), as
  rank 0 reads them: the tasks of one step are alike.
- What ends a worker rank: the scheduler closing (rank 0's end, success or failure: the
  worker closes and its nanny with it), the scheduler file no longer naming its scheduler
  (rank 0 removed it, perhaps before this rank connected), SIGTERM (``scancel``), or rank 0
  dying hard (the connection breaks; a rank that never reached the scheduler gives up after
  :data:`RANK_0_TIMEOUT`). Worker ranks ignore SIGINT: ``srun`` passes Ctrl-C to every task,
  and rank 0 ends the run in order (finished chunks kept for ``resume``), then the workers.
  So the ``srun`` step ends, and with it the ``sbatch`` job.
- Worker ranks print only their errors: Dask's INFO lines of their worker processes follow
  the level of the ``distributed`` logger of the rank (the command line lowers it only with
  ``--verbose``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import dask

from virnuc_dask.errors import VirnucError, option

logger = logging.getLogger(__name__)


#: Seconds a worker rank waits for rank 0's scheduler (its file, then a connection).
RANK_0_TIMEOUT = 120.0

#: The prefix of the workers' names; the rank follows it.
WORKER_NAME = "slurm-rank-"

# Seconds between the messages that say which ranks' workers have not joined yet.
_WAIT_MESSAGE_INTERVAL = 10.0

# Seconds between two looks of a worker rank at the scheduler file.
_FILE_POLL = 0.5

# A worker preload: the worker process ignores Ctrl-C (rank 0 ends the run in order).
_WORKER_PRELOAD = (
    "from virnuc_dask.cluster.plugin import ignore_interrupts\n\n\n"
    "def dask_setup(worker):\n"
    "    ignore_interrupts()\n"
)


@dataclasses.dataclass(frozen=True)
class Step:
    """The task of an ``srun`` step this process is.

    Attributes
    ----------
    rank
        ``SLURM_PROCID``: 0 is the scheduler and the driver.
    tasks
        Tasks of the step (``SLURM_STEP_NUM_TASKS``, else ``SLURM_NTASKS``).
    job, step
        ``SLURM_JOB_ID`` and ``SLURM_STEP_ID``.
    cpus
        CPUs of each task (``SLURM_CPUS_PER_TASK``, else 1).
    """

    rank: int
    tasks: int
    job: str
    step: str
    cpus: int

    @property
    def name(self) -> str:
        """``JOB.STEP``, as Slurm names a step."""
        return f"{self.job}.{self.step}"

    @classmethod
    def current(cls, environ: dict | None = None) -> Step:
        """The step of this process, from Slurm's variables; a user error outside one."""
        env = os.environ if environ is None else environ
        how = (
            f"{option('cluster', 'slurm-allocation')} runs as every task of one srun step: "
            "`srun virnuc-dask embed ... --cluster slurm-allocation` in an sbatch script or "
            "salloc"
        )
        if not env.get("SLURM_PROCID", "").isdigit() or not env.get("SLURM_STEP_ID"):
            where = "a batch script, not an srun step" if env.get("SLURM_JOB_ID") else "none"
            raise VirnucError(f"{how}; this process is in no srun step ({where})")
        tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        if not tasks.isdigit() or int(tasks) < 2:
            raise VirnucError(
                f"{how}, of at least 2 tasks (rank 0 schedules, the others work); this step "
                f"has {tasks} task{'s' if tasks != '1' else ''}: ask for more with --ntasks"
            )
        cpus = env.get("SLURM_CPUS_PER_TASK", "")
        return cls(
            rank=int(env["SLURM_PROCID"]),
            tasks=int(tasks),
            job=env.get("SLURM_JOB_ID", "0"),
            step=env["SLURM_STEP_ID"],
            cpus=int(cpus) if cpus.isdigit() and int(cpus) > 0 else 1,
        )


def embed_in_allocation(
    inputs: list,
    output,
    *,
    scheduler_file: str | os.PathLike | None = None,
    progress: bool = True,
    **options_and_settings,
):
    """Run :func:`virnuc_dask.embed` as one task of an ``srun`` step; rank 0 drives.

    Parameters
    ----------
    inputs, output
        As :func:`virnuc_dask.embed` takes them (read and written by rank 0).
    scheduler_file
        Where rank 0 writes its scheduler's address for the other ranks; default
        ``virnuc-dask-scheduler-JOB.STEP.json`` in the current folder. Removed at the end.
    progress
        Show progress (rank 0).
    **options_and_settings
        The other arguments of :func:`virnuc_dask.embed` (``zarr``, ``resume``, ``model``,
        ...), used by rank 0.

    Returns
    -------
    The output's path on rank 0; None on the other ranks, once rank 0 has ended the run.

    Raises
    ------
    VirnucError
        Outside an ``srun`` step, in a step of one task, a ``scheduler_file`` that is
        something else, a scheduler no worker reached; and the run's own user errors.
    """
    step = Step.current()
    path = Path(scheduler_file or f"virnuc-dask-scheduler-{step.name}.json")
    _refuse_a_foreign_file(path)
    if step.rank == 0:
        return _drive(step, path, inputs, output, progress, options_and_settings)
    serve(step, path)
    return None


# -- rank 0: the scheduler and the driver ------------------------------------------------------


def _drive(step: Step, path: Path, inputs, output, progress: bool, options: dict):
    from virnuc_dask.run.prepare import prepare

    clock = time.perf_counter()
    limit = options.get("wait_limit") or dask.config.get("virnuc-dask.wait-limit")
    with scheduler(step, path) as client:
        wait_for_ranks(client, step, float(limit))
        job = prepare(inputs, output, client=client, torch_threads=step.cpus, **options)
        job.phases = {"cluster_start": time.perf_counter() - clock, **job.phases}
        return job.run(client, progress=progress)


@contextlib.contextmanager
def scheduler(step: Step, path: Path) -> Iterator:
    """Start rank 0's scheduler, write its file, yield a client; close both, remove the file.

    The scheduler runs in this process, with no local worker; closing it closes every
    worker of the other ranks.
    """
    from distributed import Client, LocalCluster

    from virnuc_dask.cluster.local import QuickExit

    host = scheduler_host()
    try:
        cluster = LocalCluster(
            n_workers=0,
            host=host,
            scheduler_port=0,
            dashboard_address=f"{_bracketed(host)}:8787",
            # The command line's logging stands: LocalCluster would lower Dask's to warnings.
            silence_logs=False,
        )
    except OSError as error:
        raise VirnucError(
            f"rank 0 cannot start its scheduler on {host} ({error}); set "
            "virnuc-dask.allocation.host or virnuc-dask.allocation.interface to an address "
            "of this node"
        ) from None
    try:
        with cluster, Client(cluster) as client:
            client.register_plugin(QuickExit())
            write_scheduler_file(path, cluster.scheduler, step)
            logger.debug(
                "scheduler of step %s at %s (%s)", step.name, cluster.scheduler_address, path
            )
            yield client
    finally:
        _remove_own_file(path, step)


def scheduler_host() -> str:
    """The address rank 0's scheduler listens on, where other nodes reach it.

    ``virnuc-dask.allocation.host``, else the address of ``virnuc-dask.allocation.interface``,
    else the address of the node's name unless it is a loopback one, else the address of the
    interface of the default route.
    """
    from distributed.utils import get_ip, get_ip_interface

    host = dask.config.get("virnuc-dask.allocation.host", None)
    if host:
        return str(host)
    interface = dask.config.get("virnuc-dask.allocation.interface", None)
    if interface:
        try:
            return get_ip_interface(str(interface))
        except ValueError as error:
            raise VirnucError(
                f"virnuc-dask.allocation.interface {interface!r}: {error}; name an interface "
                "of this node (`ip -brief address` lists them)"
            ) from None
    with contextlib.suppress(OSError):
        named = socket.gethostbyname(socket.gethostname())
        if not ipaddress.ip_address(named).is_loopback:
            return named
    return get_ip()


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def write_scheduler_file(path: Path, scheduler, step: Step) -> None:
    """Write Dask's scheduler file at ``path``, with the step it belongs to, in one piece."""
    identity = scheduler.identity()
    content = {
        "type": identity.get("type", "Scheduler"),
        "id": identity.get("id"),
        "address": scheduler.address,
        "services": identity.get("services", {}),
        "slurm-step": step.name,
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(content, indent=2))
    os.replace(temporary, path)


def read_scheduler_file(path: Path) -> dict | None:
    """The content of a scheduler file; None while there is none (or it cannot be read)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _refuse_a_foreign_file(path: Path) -> None:
    """A file at ``path`` that is not a scheduler file is not ours to replace."""
    if not path.exists():
        return
    content = read_scheduler_file(path)
    if content is None or not isinstance(content.get("address"), str):
        raise VirnucError(
            f"scheduler file {path} exists and is not a Dask scheduler file; give another "
            f"{option('scheduler_file', 'FILE')}, or remove it"
        )


def _remove_own_file(path: Path, step: Step) -> None:
    content = read_scheduler_file(path)
    if content is not None and content.get("slurm-step") == step.name:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def wait_for_ranks(client, step: Step, limit: float) -> None:
    """Wait until a worker of every other rank has joined, or ``limit`` seconds.

    A message names the missing ranks every 10 s. Past the limit the run goes on with the
    ranks that came (a warning names the others); with none it stops with a user error.
    """
    wanted = set(range(1, step.tasks))
    started = time.monotonic()
    said = started
    while True:
        joined = _ranks(client.scheduler_info(n_workers=-1)["workers"].values())
        missing = sorted(wanted - joined)
        if not missing:
            return
        waited = time.monotonic() - started
        if waited >= limit:
            if joined:
                logger.warning(
                    "going on without the workers of rank%s %s: not joined after %g s",
                    "s" if len(missing) > 1 else "",
                    _listed(missing),
                    limit,
                )
                return
            raise VirnucError(
                f"no worker of the other ranks joined rank 0's scheduler within {limit:g} s "
                f"(wait_limit); their output says why (a node that cannot reach this one: "
                "set virnuc-dask.allocation.interface)"
            )
        if time.monotonic() - said >= _WAIT_MESSAGE_INTERVAL:
            said = time.monotonic()
            logger.warning(
                "waiting for the workers of rank%s %s (%.0f s of %g s)",
                "s" if len(missing) > 1 else "",
                _listed(missing),
                waited,
                limit,
            )
        time.sleep(0.2)


def _ranks(workers) -> set[int]:
    """The ranks that the workers' names (``slurm-rank-N`` or ``slurm-rank-N-I``) give."""
    ranks = set()
    for worker in workers:
        name = str(worker.get("name", ""))
        if name.startswith(WORKER_NAME):
            rank = name[len(WORKER_NAME) :].split("-")[0]
            if rank.isdigit():
                ranks.add(int(rank))
    return ranks


def _listed(ranks: list[int]) -> str:
    shown = ", ".join(str(r) for r in ranks[:8])
    return shown + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")


# -- the other ranks: workers ------------------------------------------------------------------


def serve(step: Step, path: Path, timeout: float = RANK_0_TIMEOUT) -> None:
    """Be a worker of rank 0's scheduler until rank 0 ends the run (or SIGTERM ends this rank).

    Ctrl-C (SIGINT) is ignored here and in the worker processes, which inherit it: rank 0
    takes it, ends the run in order, and then ends the workers.
    """
    level = logging.getLogger("distributed").getEffectiveLevel()
    if level > logging.INFO:
        # The worker processes set up Dask's logging as they import it, from the environment
        # they inherit: a level passed later would come after their first INFO lines.
        os.environ["DASK_LOGGING__DISTRIBUTED"] = logging.getLevelName(level).lower()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_serve(step, path, timeout))
    finally:
        signal.signal(signal.SIGINT, previous)


async def _serve(step: Step, path: Path, timeout: float) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    address = await _address_of(step, path, timeout)
    # Rank 0 writes one address a step; a second one means the first was a file that an
    # earlier step of the same name left (read before rank 0 replaced it): follow the new.
    while address is not None and not stop.is_set():
        address = await _work_for(step, path, address, timeout, stop)


async def _work_for(step: Step, path: Path, address: str, timeout: float, stop) -> str | None:
    """Be a worker of ``address`` until it ends; return the file's new address, if any."""
    workers = _workers(step, address, timeout)
    life = asyncio.ensure_future(_run(workers))
    moved = asyncio.ensure_future(_until_gone(path, address, step))
    ends = [life, moved, asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        if moved.done():
            return moved.result()
        if life.done() and life.exception() is not None:
            if isinstance(life.exception(), asyncio.TimeoutError | OSError):
                raise VirnucError(
                    f"rank {step.rank} cannot reach rank 0's scheduler at {address} (from "
                    f"{path}) within {timeout:g} s; if the nodes share another network, set "
                    "virnuc-dask.allocation.interface (e.g. ib0)"
                ) from None
            raise life.exception()
        return None
    finally:
        for task in ends:
            task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await workers.close(timeout=5)


async def _run(workers) -> None:
    await workers
    await workers.finished()


def _workers(step: Step, address: str, timeout: float):
    """This rank's workers, not started: one per GPU (dask-cuda), else one CPU worker."""
    from virnuc_dask.cluster.hardware import gpu_count

    preload = dask.config.get("distributed.worker.preload") or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    common = dict(
        name=f"{WORKER_NAME}{step.rank}",
        nthreads=1,
        death_timeout=timeout,
        preload=[*preload, _WORKER_PRELOAD],
    )
    if gpu_count():
        from dask_cuda import CUDAWorker

        return CUDAWorker(address, **common)
    from distributed import Nanny

    return Nanny(address, **common)


async def _address_of(step: Step, path: Path, timeout: float) -> str:
    """The scheduler address of this step's file, once rank 0 has written it."""
    deadline = time.monotonic() + timeout
    while True:
        content = read_scheduler_file(path)
        if content is not None and content.get("slurm-step") == step.name:
            return str(content["address"])
        if time.monotonic() > deadline:
            raise VirnucError(
                f"rank {step.rank}: rank 0 wrote no scheduler file {path} for step "
                f"{step.name} within {timeout:g} s; rank 0's output says why"
            )
        await asyncio.sleep(_FILE_POLL)


async def _until_gone(path: Path, address: str, step: Step) -> str | None:
    """Wait until the scheduler file no longer names ``address``; return the one it names now.

    None: the file is gone, or names another step (rank 0 removed it at its end).
    """
    while True:
        await asyncio.sleep(_FILE_POLL)
        if not path.exists():
            return None
        content = read_scheduler_file(path)
        if content is not None and content.get("address") != address:
            ours = content.get("slurm-step") == step.name
            return str(content["address"]) if ours else None
