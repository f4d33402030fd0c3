"""The GPUs' utilisation while a job runs, read from ``nvidia-smi`` once a second in a thread.

Decisions:

- ``nvidia-smi`` in a thread of the timing process, not NVML in the job: the job is measured
  as a user runs it, and the sampler costs it nothing.
- Busy seconds are the share of samples above 0 % times the wall time: how long the GPUs had
  work at all, which is what the fixed start and end of a job take away.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time

import numpy as np


class GpuSampler:
    """Utilisation of some GPUs, read from ``nvidia-smi`` once a second in a thread.

    Parameters
    ----------
    devices
        ``nvidia-smi -i`` identifiers (indices or UUIDs); empty: nothing is sampled.
    period
        Seconds between samples.
    """

    def __init__(self, devices: list[str], period: float = 1.0) -> None:
        self.devices = devices
        self.period = period
        self.samples: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> GpuSampler:
        if self.devices:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        command = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu",
            "--format=csv,noheader,nounits",
            "-i",
            ",".join(self.devices),
        ]
        next_tick = time.perf_counter()
        while not self._stop.is_set():
            with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
                out = subprocess.run(command, capture_output=True, text=True, timeout=5).stdout
                values = [float(v) for v in out.split()]
                if len(values) == len(self.devices):
                    self.samples.append(values)
            next_tick += self.period
            self._stop.wait(max(0.0, next_tick - time.perf_counter()))

    def summary(self, wall: float) -> dict:
        """Busy seconds per GPU (the share of samples above 0 % of ``wall``), their mean, and
        the mean utilisation.

        Parameters
        ----------
        wall
            The job's wall time in seconds.

        Returns
        -------
        dict
            ``gpu_busy_seconds``, ``gpu_busy_seconds_per_gpu`` and ``gpu_util``; None each
            without samples.
        """
        if not self.devices or not self.samples:
            return {"gpu_busy_seconds": None, "gpu_busy_seconds_per_gpu": None, "gpu_util": None}
        per_gpu = np.asarray(self.samples)
        busy = (per_gpu > 0).mean(axis=0) * wall
        return {
            "gpu_busy_seconds": round(float(busy.mean()), 1),
            "gpu_busy_seconds_per_gpu": [round(float(b), 1) for b in busy],
            "gpu_util": round(float(per_gpu.mean()), 1),
        }
