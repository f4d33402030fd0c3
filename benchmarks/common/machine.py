"""Where a benchmark ran: the machine, its GPUs and the package versions, for its results file.

Decisions:

- One module for the machine's description, shared by every benchmark: ``describe`` for the
  CPU benchmarks and ``per_residue.py`` (platform, memory, load average, every GPU's name), and
  ``gpu_machine`` for the job benchmarks (``job_wall.py`` and the scripts that write into its
  results file), whose files name the GPU the jobs were given and the driver, in the keys their
  committed results already use (``gpu``: a name, ``gpus``: a count).
- GPUs are read from ``nvidia-smi`` and ``CUDA_VISIBLE_DEVICES``, never through torch, so that
  the process that starts the jobs holds no GPU of its own and imports nothing heavy.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess

#: The versions that shape a job benchmark's figures.
JOB_PACKAGES = ("torch", "dask", "distributed", "dask-cuda", "fair-esm", "virnuc-dask")


def versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions of ``packages``; None for one importable from a source tree only.

    Parameters
    ----------
    packages
        Distribution names, as ``pip`` spells them.

    Returns
    -------
    dict
        Name to version string, or None.
    """
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def describe(packages: tuple[str, ...] = ()) -> dict:
    """Platform, processor, CPUs, memory, Python, load average, GPUs, and package versions.

    Parameters
    ----------
    packages
        Distribution names whose versions are recorded (none by default).

    Returns
    -------
    dict
        The description, ready for JSON.
    """
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


def visible_gpus() -> list[str]:
    """GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries; [] without nvidia-smi.

    Returns
    -------
    list of str
        ``CUDA_VISIBLE_DEVICES``'s entries when it is set, else every index nvidia-smi lists.
    """
    every = _nvidia_smi("--query-gpu=index")
    if not every:
        return []
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        return every
    return [entry.strip() for entry in given.split(",") if entry.strip()]


def gpu_machine(gpus: list[str]) -> dict:
    """GPU name and count, CPU count, and the versions that shape a job benchmark's figures.

    Parameters
    ----------
    gpus
        The GPUs the jobs were given (``visible_gpus()``); empty on the CPU.

    Returns
    -------
    dict
        ``platform``, ``python``, ``cpus``, ``gpu`` (the first GPU's name, or ``"cpu"``),
        ``gpus`` (their count), ``driver`` where there is a GPU, and ``versions`` (installed
        packages only).
    """
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "gpu": "cpu",
        "gpus": len(gpus),
    }
    found = _nvidia_smi("--query-gpu=name,driver_version", "-i", gpus[0]) if gpus else []
    if found and "," in found[0]:
        info["gpu"], info["driver"] = (part.strip() for part in found[0].split(",", 1))
    # Absent packages are left out, as the committed results of these benchmarks have them.
    info["versions"] = {k: v for k, v in versions(JOB_PACKAGES).items() if v is not None}
    return info


def _gpus() -> list[str]:
    """Name and memory of each GPU nvidia-smi lists; [] without one."""
    return _nvidia_smi("--query-gpu=name,memory.total")


def _nvidia_smi(*arguments: str) -> list[str]:
    """The lines nvidia-smi prints for a ``--query-gpu`` (CSV, no header); [] without it."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", *arguments, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]
