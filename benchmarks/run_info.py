"""Where a benchmark ran: the machine and the package versions, for its results file.

Shared by the CPU benchmarks and ``per_residue.py``; the GPU pipeline benchmarks
(``job_wall.py``, ``scaling.py``, ``gpu_throughput.py``) also record the GPUs they were given,
as torch or ``CUDA_VISIBLE_DEVICES`` sees them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess


def versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions of ``packages``; None for one importable from a source tree only."""
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def describe(packages: tuple[str, ...] = ()) -> dict:
    """Platform, processor, CPUs, memory, Python, load average, GPUs, and package versions."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
        "gpus": _gpus(),
    }
    if packages:
        info["versions"] = versions(packages)
    return info


def _gpus() -> list[str]:
    """Name and memory of each GPU nvidia-smi lists; [] without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]
