"""A local cluster that fits the machine: one worker per GPU, or CPU worker processes.

- GPUs present (dask-cuda importable and an NVIDIA driver answering): ``LocalCUDACluster``,
  one worker per GPU this process may use, each seeing its own GPU as ``cuda:0``. The GPUs are
  those of ``CUDA_VISIBLE_DEVICES`` when it is set (a batch scheduler that hands out GPUs 2
  and 3, UUIDs or MIG slices), all of the machine's otherwise (:func:`visible_devices`).
- No GPU: a ``LocalCluster`` of worker processes, one thread each, torch given each worker's
  share of the cores (Dask pins ``OMP_NUM_THREADS=1`` in workers).

Decisions:

- Local clusters and their dashboards listen on 127.0.0.1 only, unless ``host`` says otherwise.
- Worker processes of local clusters skip the final garbage collection of interpreter exit
  (:class:`QuickExit`): over torch's object graph it costs a second of CPU per process, and
  with several workers on a few cores the nanny lost patience (4 s) and killed them.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import dask
from distributed import Client, LocalCluster, WorkerPlugin

from virnuc_dask.cluster.hardware import ClusterInfo, physical_gpus, visible_devices

if TYPE_CHECKING:
    from virnuc_dask.cluster.plugin import EngineSettings
logger = logging.getLogger(__name__)


class QuickExit(WorkerPlugin):
    """Let a worker process exit without a last garbage collection over torch's objects.

    Python collects every tracked object when a process ends; with torch imported that takes
    about a second of CPU per worker, several at once on a small machine, and the nanny kills
    a worker that has not exited 4 s after closing. ``gc.freeze()`` at exit leaves the
    objects to the operating system. Nothing is lost: shards are written and closed inside
    their tasks, and C libraries (HDF5, CUDA) still run their own exit handlers.
    """

    name = "virnuc-dask-quick-exit"

    def setup(self, worker) -> None:
        """Register the freeze as the first thing the worker process does at exit."""
        atexit.unregister(gc.freeze)  # idempotent when the plugin is registered again
        atexit.register(gc.freeze)


def start_local_cluster(
    plan,
    *,
    host: str = "127.0.0.1",
    dashboard_port: int = 8787,
    local_directory: str | os.PathLike | None = None,
    engine: EngineSettings | None = None,
):
    """Start the local cluster of ``plan`` (a :class:`ClusterInfo` from :func:`local_plan`).

    Returns the started ``LocalCUDACluster`` (GPUs) or ``LocalCluster``, its workers running
    and loading ``engine``'s model; :func:`attach` connects to it. Safe to call from a thread
    other than the one that attaches (nothing here is bound to the calling context).
    """
    dashboard = f"{host}:{dashboard_port}"
    preload = _preload(engine)
    if plan.gpus:
        from dask_cuda import LocalCUDACluster

        devices = visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), physical_gpus())
        return LocalCUDACluster(
            n_workers=plan.workers,
            CUDA_VISIBLE_DEVICES=devices[: plan.workers],
            host=host,
            dashboard_address=dashboard,
            local_directory=local_directory,
            **preload,
        )
    return LocalCluster(
        n_workers=plan.workers,
        threads_per_worker=1,
        processes=True,
        host=host,
        dashboard_address=dashboard,
        local_directory=local_directory,
        **preload,
    )


@contextlib.contextmanager
def attach(cluster, plan) -> Iterator[tuple[Client, ClusterInfo]]:
    """Yield a client of a started local cluster and its :class:`ClusterInfo`; close both.

    The client closes before the cluster (inner context first), so it never tries to
    reconnect to a scheduler that is already gone.
    """
    with cluster, Client(cluster) as client:
        client.register_plugin(QuickExit())
        yield (
            client,
            ClusterInfo(plan.workers, plan.gpus, plan.torch_threads, client.dashboard_link),
        )


def _preload(engine: EngineSettings | None) -> dict:
    """Worker arguments that add the early model load to the configured preloads."""
    if engine is None:
        return {}
    from virnuc_dask.cluster.plugin import early_load_preload

    preload = dask.config.get("distributed.worker.preload") or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    return {"preload": [*preload, early_load_preload(engine)]}
