"""The work folder of the job benchmarks: their environment, inputs and checkpoints.

Decisions:

- Every job runs with ``TORCH_HOME=WORK/torch`` and ``XDG_CACHE_HOME=WORK/cache``, so the
  random-weight checkpoints (``common.checkpoints``), their digest and the compile caches
  live in ``WORK``: a fresh ``WORK`` starts cold, a reused one warm, and several benchmarks
  (``job_wall.py``, ``notebook_wall.py``, ``engine_steady.py``, ``gpu_speedup.py``,
  ``model_load.py``, ``per_residue.py``) can share one setup.
- ``PYTHONPATH`` starts with the repository, so the jobs run the checkout's package.
- ``--smoke`` hides every GPU (``CUDA_VISIBLE_DEVICES=""``): the CPU path, even on a GPU
  machine. Without it a machine with no GPU is an error, not a silent CPU run.
- A setup that fails for one model ends the benchmark: every later job would fail the same way.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.checkpoints import child_checkpoint
from common.children import child
from common.machine import visible_gpus
from common.tables import fmt
from common.workloads import SMALL_SEQUENCES, write_inputs

REPO = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Work:
    """A work folder and what the jobs in it run with.

    Parameters
    ----------
    folder
        The folder (absolute): inputs, ``torch/``, ``cache/``, ``out/`` and ``logs/``.
    env
        The jobs' environment.
    gpus
        The GPUs the jobs may use (``CUDA_VISIBLE_DEVICES`` entries); empty with ``--smoke``.
    smoke
        The CPU check.
    """

    folder: Path
    env: dict
    gpus: list[str]
    smoke: bool

    def env_for(self, devices: list[str]) -> dict:
        """The environment of a child that may use ``devices`` (all hidden with ``--smoke``)."""
        env = dict(self.env)
        if not self.smoke:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        return env


def open_work(folder: Path, smoke: bool) -> Work:
    """Create the work folder and the jobs' environment; exit if no GPU is visible.

    Parameters
    ----------
    folder
        The work folder; created, and reused when present.
    smoke
        The CPU check: every GPU hidden.

    Returns
    -------
    Work
        The folder, the environment and the visible GPUs.
    """
    folder = folder.resolve()
    (folder / "out").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        TORCH_HOME=str(folder / "torch"),
        XDG_CACHE_HOME=str(folder / "cache"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    gpus = [] if smoke else visible_gpus()
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a GPU machine
    elif not gpus:
        sys.exit("no GPU visible (nvidia-smi); use --smoke for the CPU check")
    return Work(folder, env, gpus, smoke)


def prepare(work: Work, models: list[str], viral: int, seed: int) -> tuple[dict, dict]:
    """Write the inputs (``small`` and ``viral``) and each model's checkpoint; report both.

    Parameters
    ----------
    work
        The work folder.
    models
        The models whose checkpoints are written (reused when present).
    viral
        Peptides in ``viral`` (its first N).
    seed
        Seed of the peptides and of the weights.

    Returns
    -------
    tuple
        The inputs by workload (``path``, ``sequences``, ``tokens``) and the setup's record
        (``inputs_seconds``, ``checkpoints``).
    """
    started = time.perf_counter()
    inputs = write_inputs(work.folder, {"small": SMALL_SEQUENCES, "viral": viral}, seed)
    setup: dict = {"inputs_seconds": round(time.perf_counter() - started, 2), "checkpoints": []}
    for name, item in inputs.items():
        print(f"input {name}: {item['sequences']:,} sequences, {item['tokens']:,} tokens")
    for model in models:
        started = time.perf_counter()
        made = child(child_checkpoint, work.env, 3600, model=model, seed=seed)
        made["seconds"] = round(time.perf_counter() - started, 2)
        setup["checkpoints"].append(made)
        what = "reused" if made.get("reused") else "written"
        print(
            f"checkpoint {model}: {what} in {made['seconds']:.1f} s "
            f"({fmt(made.get('bytes', 0) / 1e9, '.2f')} GB; digest "
            f"{fmt(made.get('digest_seconds'), '.1f')} s)",
            flush=True,
        )
        if "error" in made:
            sys.exit(f"setup of {model} failed: {made['error']}")
    return inputs, setup
