"""One ``virnuc-dask embed`` command as a fresh process, timed from start to file on disk.

Each job is the command line (``python -m virnuc_dask.cli embed IN -o OUT --model NAME
--workers N --overwrite --verbose``) run as a fresh process with the first N GPUs visible,
timed with ``time.perf_counter()`` around the process: interpreter start, imports, indexing,
cluster start, model load, compile, compute, assembly and the cluster's close all count, as
they do for the user.

Decisions:

- Each output line of a job is logged with its time since the start; the row keeps when the
  first line, the dashboard link and the ``wrote`` line appeared (``timeline``) and each
  worker's model load steps (``load_detail``), so the time outside the logged phases splits
  into start and exit.
- The phases the tool logs with ``--verbose`` are kept (``phases_logged``), and what they leave
  of the wall time (``outside_phases_seconds``: interpreter, imports, exit); the phases the
  output file records (attribute ``phases``) give the steady rate (``common.results``).
- CLI flags the installed tool lacks (``--verbose``) are dropped after reading ``--help``, so
  an older version of the tool can be timed the same way.
- A job runs in a session of its own: one past its time is ended with its Dask workers
  (SIGTERM, so the CLI closes its cluster, then SIGKILL).
- Small jobs run twice; the second (warm page cache, warm compile cache) is the one the
  targets judge. ``viral`` jobs run once (or twice on request); the first job of a model in a
  fresh work folder that compiles pays the cold compile, which its ``compile`` phase shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from common.children import tail
from common.gpu_sampler import GpuSampler
from common.results import RUNS, fill_rates
from common.tables import fmt


def cli_flags(env: dict[str, str]) -> set[str]:
    """The long options ``virnuc-dask embed`` has in the installed version.

    Parameters
    ----------
    env
        The jobs' environment (its ``PYTHONPATH`` picks the package).

    Returns
    -------
    set of str
        Every ``--option`` its help text names.
    """
    out = subprocess.run(
        [sys.executable, "-m", "virnuc_dask.cli", "embed", "--help"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", out))


def run_job(
    spec: dict,
    fasta: Path,
    output: Path,
    log: Path,
    env: dict,
    flags: set,
    timeout: float,
    extra: tuple[str, ...] = (),
) -> dict:
    """Run the command line once as a fresh process; return its wall time and what it wrote.

    Parameters
    ----------
    spec
        ``model``, ``workers`` and ``devices`` (the ``CUDA_VISIBLE_DEVICES`` entries; None:
        the environment's).
    fasta, output
        The command's input and output files.
    log
        Where the command's output goes, each line stamped with its time since the start.
    env
        The command's environment.
    flags
        The options the installed CLI has (``cli_flags``).
    timeout
        Seconds before the job is ended.
    extra
        More options of the command (``--translate six-frame``, ``--cache DIR``).

    Returns
    -------
    dict
        ``returncode``, ``wall_seconds`` (None on failure), ``log``, the GPU sampler's
        summary, ``phases`` (the output's), ``timeline``, ``load_detail``, and with
        ``--verbose`` ``phases_logged`` and ``outside_phases_seconds``; ``error`` on failure.
    """
    command = [sys.executable, "-m", "virnuc_dask.cli", "embed", str(fasta), "-o", str(output)]
    command += ["--model", spec["model"], "--workers", str(spec["workers"]), "--overwrite"]
    if "--verbose" in flags:
        command.append("--verbose")
    command += list(extra)
    env = dict(env)
    if spec["devices"] is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(spec["devices"])
    log.parent.mkdir(parents=True, exist_ok=True)
    marks: dict[str, float] = {}
    with open(log, "w") as out, GpuSampler(spec["devices"] or []) as sampler:
        started = time.perf_counter()
        # A session of its own, so a job past its time is ended with its Dask workers.
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=True,
            errors="replace",
        )
        reader = threading.Thread(
            target=_timestamped, args=(process.stdout, out, started, marks), daemon=True
        )
        reader.start()
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = _end(process)
        wall = time.perf_counter() - started
        reader.join(timeout=10)
    text = log.read_text(errors="replace")
    result = {
        "returncode": code,
        "wall_seconds": round(wall, 3) if code == 0 else None,
        "log": str(log),
        **sampler.summary(wall),
        "phases": read_phases(output) if code == 0 else None,
    }
    if code != 0:
        last = text.strip().splitlines()[-1:] or [f"exit {code}"]
        result["error"] = "timed out" if code is None else last[0]
        print(f"    failed ({result['error']}); log: {log}\n{tail(text)}", flush=True)
    # With --verbose the tool logs every phase, the file's later ones (assembly, close) too;
    # what they leave of the wall time is the interpreter's start, imports and exit.
    # When the command printed its first line, the dashboard link (cluster up), and the
    # written file, in seconds from its start: the outside time splits into start and exit.
    result["timeline"] = {**{k: round(v, 2) for k, v in marks.items()}, "exit": round(wall, 2)}
    result["load_detail"] = [
        {"early": bool(early), **{k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", steps)}}
        for early, steps in re.findall(r"model load on \S+?( \(begun[^)]*\))?: (.*)", text)
    ]
    logged = re.findall(r"phases: (.*)", text)
    if logged:
        phases = dict(re.findall(r"(\w+) ([\d.]+) s", logged[-1]))
        result["phases_logged"] = {k: float(v) for k, v in phases.items()}
        if code == 0:
            outside = wall - sum(result["phases_logged"].values())
            result["outside_phases_seconds"] = round(outside, 2)
    return result


def model_jobs(
    model: str,
    inputs: dict[str, dict],
    gpus: list[str],
    env: dict,
    flags: set,
    work: Path,
    *,
    workloads: list[str],
    gpu_counts: list[int],
    smoke: bool,
    viral_runs: int,
    timeout: float,
) -> list[dict]:
    """Every job of one model: each workload on each GPU count, small ones twice.

    Parameters
    ----------
    model
        The model the jobs embed with.
    inputs
        ``common.work.prepare``'s inputs, by workload.
    gpus
        The GPUs visible (a job on N of them gets the first N).
    env, flags
        The jobs' environment and the CLI's options (``cli_flags``).
    work
        The work folder: outputs under ``out/``, logs under ``logs/``.
    workloads, gpu_counts
        Which workloads, on how many GPUs each (0: the CPU).
    smoke
        The CPU check: every job on 2 CPU worker processes.
    viral_runs
        How often each ``viral`` job runs (1 or 2).
    timeout
        Seconds per job.

    Returns
    -------
    list of dict
        One row per job run, with its rates filled in (``common.results.fill_rates``).
    """
    rows = []
    for workload in workloads:
        item = inputs[workload]
        for count in gpu_counts:
            if count > len(gpus) and not smoke:
                print(f"  {model} {workload} on {count} GPUs: skipped, {len(gpus)} visible")
                continue
            spec = {
                "model": model,
                "workers": 2 if smoke else count,
                "devices": None if smoke else gpus[:count],
            }
            for run in RUNS[: 2 if workload == "small" else viral_runs]:
                tag = f"{model}-{workload}-{count}gpu-{run}"
                output = work / "out" / f"{model}-{workload}-{count}gpu.h5"
                print(f"  {tag} ...", flush=True)
                log = work / "logs" / f"{tag}.log"
                measured = run_job(spec, item["path"], output, log, env, flags, timeout)
                row = {
                    "model": model,
                    "workload": workload,
                    "gpus": count,
                    "workers": spec["workers"],
                    "run": run,
                    "sequences": item["sequences"],
                    "tokens": item["tokens"],
                    **measured,
                }
                fill_rates(row, None)
                rows.append(row)
                print(
                    f"    wall {fmt(row['wall_seconds'], '.2f')} s, GPU busy "
                    f"{fmt(row['gpu_busy_seconds'])} s",
                    flush=True,
                )
    return rows


def read_phases(output: Path) -> dict | None:
    """The ``phases`` attribute of an output file (seconds per phase), if the tool wrote one.

    Parameters
    ----------
    output
        An HDF5 file the tool wrote.

    Returns
    -------
    dict or None
        Phase name to seconds; None where the file or its attribute is missing or unreadable.
    """
    import h5py

    try:
        with h5py.File(output, "r") as f:
            raw = f.attrs.get("phases")
    except OSError:
        return None
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode()
    try:
        phases = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (TypeError, ValueError):
        return None
    return phases if isinstance(phases, dict) else None


def _timestamped(stream, out, started: float, marks: dict[str, float]) -> None:
    """Copy the command's output to its log, each line prefixed with its time since start."""
    for line in stream:
        now = time.perf_counter() - started
        marks.setdefault("first_line", now)
        if "Dask dashboard" in line:
            marks.setdefault("dashboard_line", now)
        if line.startswith("wrote "):
            marks["wrote_line"] = now
        out.write(f"[{now:7.2f}] {line}")
        out.flush()


def _end(process: subprocess.Popen) -> None:
    """End a job past its time: SIGTERM to its session (the CLI closes its cluster), then KILL."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
            return None
    return None
