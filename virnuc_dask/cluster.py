"""Cluster: connect to the scheduler a run uses, or start a local cluster that fits the machine.

- GPUs present (dask-cuda importable and an NVIDIA driver answering): ``LocalCUDACluster``,
  one worker per GPU, each seeing its own GPU as ``cuda:0``.
- No GPU: a ``LocalCluster`` of worker processes, one thread each, torch given each worker's
  share of the cores (Dask pins ``OMP_NUM_THREADS=1`` in workers).
- ``scheduler`` / ``scheduler_file``: an existing cluster (``dask scheduler`` with ``dask cuda
  worker`` or ``dask worker``); nothing is started or stopped.

Local clusters and their dashboards listen on 127.0.0.1 only, unless ``host`` says otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from distributed import Client, LocalCluster

from virnuc_dask.errors import VirnucError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterInfo:
    """What the run learns about its cluster."""

    workers: int
    gpus: int
    torch_threads: int | None
    dashboard: str | None


def gpu_count() -> int:
    """Number of NVIDIA GPUs usable by a ``LocalCUDACluster``: 0 without dask-cuda or driver."""
    try:
        from dask_cuda.utils import get_n_gpus
    except ImportError:
        return 0
    try:
        return int(get_n_gpus())
    except Exception:  # no driver, no NVML: a CPU machine with dask-cuda installed
        return 0


def default_cpu_workers(cores: int) -> int:
    """CPU workers of a local cluster: one per two cores, at least one and at most four.

    Few workers with several torch threads each beat many single-threaded ones for matrix
    work, and each worker holds its own copy of the model.
    """
    return max(1, min(4, cores // 2))


def local_plan(workers: int | None = None) -> ClusterInfo:
    """Decide the shape of a local cluster on this machine, before starting it.

    One worker per GPU when there are GPUs (at most ``workers``); otherwise ``workers`` CPU
    worker processes (default :func:`default_cpu_workers`), each given its share of cores.
    """
    gpus = gpu_count()
    if gpus:
        n = min(workers or gpus, gpus)
        return ClusterInfo(n, n, None, None)
    cores = os.cpu_count() or 1
    n = workers or default_cpu_workers(cores)
    return ClusterInfo(n, 0, max(1, cores // n), None)


@contextlib.contextmanager
def connect(
    *,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    workers: int | None = None,
    host: str = "127.0.0.1",
    dashboard_port: int = 8787,
    local_directory: str | os.PathLike | None = None,
) -> Iterator[tuple[Client, ClusterInfo]]:
    """Yield a client and what is known of its cluster; close what this call started.

    Parameters
    ----------
    scheduler
        Address of an existing scheduler (``tcp://host:8786``).
    scheduler_file
        Scheduler file written by ``dask scheduler --scheduler-file``.
    workers
        Workers of a local cluster (see :func:`local_plan`).
    host
        Interface a local cluster and its dashboard listen on.
    dashboard_port
        Port of a local cluster's dashboard (another is taken if it is busy).
    local_directory
        Scratch space of a local cluster's workers; default: Dask's ``temporary-directory``.
    """
    if scheduler and scheduler_file:
        raise VirnucError("give --scheduler or --scheduler-file, not both")
    if scheduler or scheduler_file:
        with _existing(scheduler, scheduler_file) as client:
            count = len(client.scheduler_info(n_workers=-1)["workers"])
            yield client, ClusterInfo(count, 0, None, client.dashboard_link)
        return
    plan = local_plan(workers)
    dashboard = f"{host}:{dashboard_port}"
    if plan.gpus:
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(
            n_workers=plan.workers,
            CUDA_VISIBLE_DEVICES=list(range(plan.workers)),
            host=host,
            dashboard_address=dashboard,
            local_directory=local_directory,
        )
    else:
        cluster = LocalCluster(
            n_workers=plan.workers,
            threads_per_worker=1,
            processes=True,
            host=host,
            dashboard_address=dashboard,
            local_directory=local_directory,
        )
    with cluster, Client(cluster) as client:
        yield (
            client,
            ClusterInfo(plan.workers, plan.gpus, plan.torch_threads, client.dashboard_link),
        )


@contextlib.contextmanager
def _existing(scheduler: str | None, scheduler_file: str | None) -> Iterator[Client]:
    if scheduler_file and not os.path.isfile(scheduler_file):
        raise VirnucError(f"scheduler file {scheduler_file} does not exist")
    try:
        client = Client(address=scheduler, scheduler_file=scheduler_file, timeout="20s")
    except OSError as error:
        where = scheduler or scheduler_file
        raise VirnucError(
            f"cannot reach the Dask scheduler at {where}: {error}; is `dask scheduler` running?"
        ) from None
    with client:
        try:
            client.wait_for_workers(1, timeout="120s")
        except TimeoutError:
            raise VirnucError(
                f"the scheduler at {client.scheduler.address} has no workers after 120 s; "
                "start some with `dask worker` or `dask cuda worker`"
            ) from None
        yield client
