"""Hardware: what this machine offers a local cluster, decided before any cluster starts.

The GPUs this process may use (``CUDA_VISIBLE_DEVICES`` honoured), the cores, and the shape of a
local cluster that fits them (:func:`local_plan`). Kept apart from :mod:`virnuc_dask.cluster`
so that planning imports neither Dask's distributed scheduler nor torch: the command line
plans, then validates the inputs, and only then starts anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterInfo:
    """What the run learns about its cluster.

    Parameters
    ----------
    workers
        Number of workers.
    gpus
        Number of GPUs of a local cluster (0 for a CPU or an existing cluster).
    torch_threads
        Threads torch gets in each CPU worker of a local cluster.
    dashboard
        Link to the Dask dashboard.
    """

    workers: int
    gpus: int
    torch_threads: int | None
    dashboard: str | None


def visible_devices(env_value: str | None, count: int) -> list[str]:
    """The GPUs a process may use, as CUDA reads ``CUDA_VISIBLE_DEVICES``.

    Parameters
    ----------
    env_value
        The value of ``CUDA_VISIBLE_DEVICES``; ``None`` when it is unset.
    count
        GPUs on the machine (as NVML counts them).

    Returns
    -------
    list of str
        Unset: every GPU, ``"0"`` to ``count - 1``. Set: its entries in order (ordinals,
        ``GPU-`` or ``MIG-`` UUIDs), up to the first that CUDA would not accept (an ordinal
        out of range, a repeat, anything else), as CUDA stops there; ``""`` hides all GPUs.

    Examples
    --------
    >>> visible_devices("2,3", 4)
    ['2', '3']
    >>> visible_devices(None, 2)
    ['0', '1']
    >>> visible_devices("", 8)
    []
    """
    if env_value is None:
        return [str(i) for i in range(count)]
    devices: list[str] = []
    for entry in (e.strip() for e in env_value.split(",")):
        valid = int(entry) < count if entry.isdigit() else entry.startswith(("GPU-", "MIG-"))
        if not valid or entry in devices:
            break
        devices.append(entry)
    return devices


def physical_gpus() -> int:
    """NVIDIA GPUs on the machine, as NVML counts them: 0 without dask-cuda or a driver."""
    try:
        from dask_cuda.utils import get_gpu_count
    except ImportError:
        return 0
    try:
        return int(get_gpu_count())
    except Exception:  # no driver, no NVML: a CPU machine with dask-cuda installed
        return 0


def gpu_count() -> int:
    """GPUs a ``LocalCUDACluster`` of this process may use: 0 without dask-cuda or driver.

    Honours ``CUDA_VISIBLE_DEVICES`` (see :func:`visible_devices`).
    """
    physical = physical_gpus()
    if not physical:
        return 0
    return len(visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), physical))


def default_cpu_workers(cores: int) -> int:
    """CPU workers of a local cluster: one per two cores, at least one and at most four.

    Few workers with several torch threads each beat many single-threaded ones for matrix
    work, and each worker holds its own copy of the model.
    """
    return max(1, min(4, cores // 2))


def local_plan(workers: int | None = None) -> ClusterInfo:
    """Decide the shape of a local cluster on this machine, before starting it.

    One worker per usable GPU when there are GPUs (at most ``workers``); otherwise
    ``workers`` CPU worker processes (default :func:`default_cpu_workers`), each given its
    share of cores.
    """
    gpus = gpu_count()
    if gpus:
        n = min(workers or gpus, gpus)
        return ClusterInfo(n, n, None, None)
    cores = usable_cpus()
    n = workers or default_cpu_workers(cores)
    return ClusterInfo(n, 0, max(1, cores // n), None)


def usable_cpus() -> int:
    """The cores this process may use: its CPU affinity, a cgroup's CPU quota and a Slurm
    allocation's CPUs, whichever is least (``os.cpu_count()`` counts the whole machine).

    A container limited to 2 CPUs on a 64-core host, or a Slurm job given 4 CPUs, would
    otherwise start workers and torch threads for every core of the host.
    """
    counts = [os.cpu_count() or 1]
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS has no affinity
        counts.append(len(os.sched_getaffinity(0)))
    quota = _cgroup_quota()
    if quota is not None:
        counts.append(quota)
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            counts.append(int(value))
            break
    return max(1, min(counts))


def _cgroup_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """CPUs of a cgroup v2 quota (``cpu.max``: ``QUOTA PERIOD`` or ``max PERIOD``), rounded up."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))
