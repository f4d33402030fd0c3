"""The job benchmarks' results file: one per day and GPU, merged, with one set of targets.

``job_wall.py``, ``notebook_wall.py``, ``engine_steady.py`` and ``gpu_speedup.py`` each measure
one question about what a user waits for, and write into the same file,
``results/job_wall-<date>-<gpu>.json`` (``benchmark: "job_wall"``): ``rows`` (command-line
jobs), ``notebook`` (the notebook case), ``engine_alone`` (the engine's own steady rate),
``invocations`` (every command that wrote into it, with its arguments and setup) and
``targets`` (recomputed from the merged content at every write).

Decisions:

- One file per day and GPU, merged: runs split over several commands (to fit a time limit per
  command) give one table, and the 2-GPU speed-up can compare a 2-GPU job with a 1-GPU job of
  an earlier command. A job or notebook case measured again replaces its row; an earlier file
  of another benchmark or another GPU is replaced whole. The file keeps the name and layout it
  had when one script measured all of it, so the committed results stay readable.
- The steady rate a job is compared with is the engine's own, in the same session: tokens over
  the compute phase when the output file records its phases (attribute ``phases``), else the
  packed engine alone over the ``viral`` set in a fresh process (one GPU only: a 2-GPU rate
  is never assumed to be twice the 1-GPU one; without phases it stays null).
- The targets live here, in one place, because every write recomputes all of them from the
  merged file, whichever script wrote.
"""

from __future__ import annotations

import json
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from common.workloads import WORKLOADS

RESULTS = Path(__file__).resolve().parent.parent / "results"
BENCHMARK = "job_wall"
MODELS = ["esm2_t36_3B_UR50D", "esm2_t33_650M_UR50D"]
RUNS = ["first", "second"]

#: What a user should wait for at most, and how close to the engine a long job should come.
SMALL_WALL_TARGETS = {"esm2_t36_3B_UR50D": 15.0, "esm2_t33_650M_UR50D": 10.0}
VIRAL_RATIO_TARGETS = {"esm2_t36_3B_UR50D": 0.90, "esm2_t33_650M_UR50D": 0.80}
NOTEBOOK_SECOND_TARGET = 3.0
TWO_GPU_SPEEDUP_TARGET = 1.85


def short(model: str) -> str:
    """A model's short name in tables: ``esm2_t36_3B_UR50D`` -> ``3B``."""
    return model.split("_")[2] if model.count("_") >= 2 else model


def steady_rate(row: dict, engine: dict | None) -> tuple[float | None, str | None]:
    """The engine's steady tokens/s for a job: from its phases, else the engine alone on 1 GPU.

    Parameters
    ----------
    row
        A job's row (``tokens``, ``gpus``, ``phases``).
    engine
        ``engine_steady.py``'s measurement of the job's model, or None.

    Returns
    -------
    tuple
        The rate and its source (``"phases"`` or ``"engine"``), or ``(None, None)``.
    """
    compute = (row.get("phases") or {}).get("compute")
    if isinstance(compute, int | float) and compute > 0:
        return row["tokens"] / compute, "phases"
    if row["gpus"] <= 1 and engine and "tokens_per_s" in engine:
        return engine["tokens_per_s"], "engine"
    return None, None


def fill_rates(row: dict, engine: dict | None) -> None:
    """Set a row's wall tokens/s, steady rate and their ratio (None where a figure is missing).

    Parameters
    ----------
    row
        A job's row, changed in place.
    engine
        The engine alone's measurement of the row's model, or None.
    """
    wall = row["wall_seconds"]
    row["wall_tokens_per_s"] = round(row["tokens"] / wall, 1) if wall else None
    steady, source = steady_rate(row, engine)
    row["steady_tokens_per_s"] = None if steady is None else round(steady, 1)
    row["steady_source"] = source
    if steady is None and row["gpus"] > 1:
        row["steady_note"] = "no phases in the output: a multi-GPU steady rate is not assumed"
    ratio = row["wall_tokens_per_s"] / steady if steady and row["wall_tokens_per_s"] else None
    row["wall_over_steady"] = None if ratio is None else round(ratio, 4)


def pick(rows: list[dict], model: str, workload: str, gpus: int) -> dict | None:
    """A job's last run: the second where it ran twice (warm caches); None if it did not run."""
    job = (model, workload, gpus)
    hits = [r for r in rows if (r["model"], r["workload"], r["gpus"]) == job]
    return max(hits, key=lambda r: RUNS.index(r["run"])) if hits else None


def speedup(rows: list[dict], model: str) -> float | None:
    """Wall time of a model's ``viral`` job on 1 GPU over that on 2; None unless both ran."""
    one, two = pick(rows, model, "viral", 1), pick(rows, model, "viral", 2)
    if one and two and one["wall_seconds"] and two["wall_seconds"]:
        return one["wall_seconds"] / two["wall_seconds"]
    return None


def targets(rows: list[dict], notebooks: list[dict]) -> list[dict]:
    """Each target with what was measured (``None``: not run here) and pass or miss.

    Parameters
    ----------
    rows, notebooks
        The file's job rows and notebook cases.

    Returns
    -------
    list of dict
        ``target``, ``limit``, ``measured`` and ``result`` (``pass``, ``miss`` or ``n/a``).
    """
    models = list(dict.fromkeys(r["model"] for r in rows + notebooks))
    found = []

    def add(name: str, measured, limit: float, at_least: bool, row: dict | None = None) -> None:
        ok = None if measured is None else (measured >= limit if at_least else measured <= limit)
        found.append(
            {
                "target": name + (f" ({row['run']} run)" if row else ""),
                "limit": limit,
                "measured": None if measured is None else round(measured, 3),
                "result": {True: "pass", False: "miss", None: "n/a"}[ok],
            }
        )

    gpu_counts = sorted({r["gpus"] for r in rows}) or [1]
    for model, limit in SMALL_WALL_TARGETS.items():
        row = pick(rows, model, "small", gpu_counts[0])
        add(f"{short(model)} small wall s", row and row["wall_seconds"], limit, False, row)
    for book in notebooks or [{"model": m} for m in models or MODELS]:
        add(
            f"{short(book['model'])} notebook second job s",
            book.get("second_seconds"),
            NOTEBOOK_SECOND_TARGET,
            False,
        )
    for model, limit in VIRAL_RATIO_TARGETS.items():
        for gpus in gpu_counts:
            row = pick(rows, model, "viral", gpus)
            label = f"{short(model)} viral wall/steady, {f'{gpus} GPU' if gpus else 'CPU'}"
            if row is not None or gpus == gpu_counts[0]:
                add(label, row and row["wall_over_steady"], limit, True, row)
    for model in models or MODELS:
        add(
            f"{short(model)} viral 2-GPU wall speed-up",
            speedup(rows, model),
            TWO_GPU_SPEEDUP_TARGET,
            True,
        )
    return found


def merged(earlier: dict, result: dict) -> dict:
    """``result`` plus what an earlier run into the same file measured and this one did not.

    Runs split over several commands (to fit a time limit per command) so give one table:
    a job or notebook case measured again replaces the earlier figure. An earlier file of
    another benchmark or another GPU is replaced whole.

    Parameters
    ----------
    earlier
        The file's content before this run.
    result
        This run's content (changed in place and returned).

    Returns
    -------
    dict
        The merged content, without ``targets`` (``save`` recomputes them).
    """
    if (
        earlier.get("benchmark") != BENCHMARK
        or earlier.get("machine", {}).get("gpu") != (result["machine"]["gpu"])
    ):
        return result

    def job(r: dict) -> tuple:
        return r["model"], r["workload"], r["gpus"], r["run"]

    def book(r: dict) -> tuple:
        return r["model"], r.get("gpus")

    for field, key in (("rows", job), ("notebook", book)):
        again = {key(r) for r in result[field]}
        result[field] = [r for r in earlier.get(field, []) if key(r) not in again] + result[field]
    result["rows"].sort(
        key=lambda r: (r["model"], WORKLOADS.index(r["workload"]), r["gpus"], r["run"])
    )
    result["engine_alone"] = {**earlier.get("engine_alone", {}), **result["engine_alone"]}
    result["invocations"] = earlier.get("invocations", []) + result["invocations"]
    return result


def save(
    invocation: dict,
    machine: dict,
    *,
    smoke: bool,
    out_json: Path | None,
    fresh: bool,
    rows: list[dict] | None = None,
    notebooks: list[dict] | None = None,
    engines: dict[str, dict] | None = None,
) -> tuple[Path, dict]:
    """Merge one command's measurements into the day's file, recompute targets, write it, and
    say where (with the machine).

    Parameters
    ----------
    invocation
        What the command was: ``script``, ``args``, ``workloads``, ``setup`` and
        ``cli_flags_dropped``; dated here.
    machine
        ``common.machine.gpu_machine``'s description.
    smoke
        The CPU check: the file is named ``...-cpu.json`` and goes to the temporary folder.
    out_json
        Where the file goes instead of ``results/job_wall-<date>-<gpu>.json``.
    fresh
        Replace the file instead of merging into it.
    rows, notebooks, engines
        What the command measured.

    Returns
    -------
    tuple
        The file's path and its whole content.
    """
    slug = "cpu" if smoke else re.sub(r"[^a-z0-9]+", "-", machine["gpu"].lower()).strip("-")
    name = f"{BENCHMARK}-{datetime.now(UTC):%Y%m%d}-{slug}.json"
    out = out_json or (Path(tempfile.gettempdir()) if smoke else RESULTS) / name
    now = datetime.now(UTC).isoformat(timespec="seconds")
    rows, notebooks = list(rows or []), list(notebooks or [])
    for item in rows + notebooks:
        item["date"] = now
    result = {
        "benchmark": BENCHMARK,
        "date": now,
        "machine": machine,
        "invocations": [{"date": now, **invocation}],
        "engine_alone": dict(engines or {}),
        "rows": rows,
        "notebook": notebooks,
    }
    if not fresh and out.exists():
        result = merged(json.loads(out.read_text()), result)
    result["targets"] = targets(result["rows"], result["notebook"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{machine['gpu']} x{machine['gpus']}, {machine['cpus']} CPUs; wrote {out}\n")
    return out, result
