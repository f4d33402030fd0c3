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
- The early start (:class:`EarlyCluster`): a run's local cluster starts in a thread while the
  driver indexes the inputs, its workers loading the model as they start (their preload), so
  a long index hides the cluster's start and the model's load. The thread only starts the
  cluster; the client is made in the driver's thread, since a Dask client belongs to the
  context that made it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import dask
from distributed import Client, LocalCluster, WorkerPlugin

from virnuc_dask.cluster.hardware import ClusterInfo, physical_gpus, visible_devices
from virnuc_dask.errors import VirnucError

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
