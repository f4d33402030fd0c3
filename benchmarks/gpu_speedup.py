"""What a second GPU buys: the ``viral`` command on 2 GPUs against 1, by the wall clock.

The engine's steady rate scales with the GPUs (two workers, one chunk each at a time); the
command's wall clock does not as much, because its start (interpreter, imports, index, cluster
start, model load, warm-up) and end (assembly, close) are not shortened by a second GPU. This
benchmark runs the ``viral`` job of each model on 1 and on 2 GPUs as ``job_wall.py`` runs every
job (the command line as a fresh process, ``common.cli_job``), and prints, per model, the wall
speed-up (target >= 1.85x), the steady speed-up (tokens over the ``compute`` phase), and each
phase on 1 and 2 GPUs with what the second GPU saved.

Decisions:

- Both jobs of a model run on one machine, in one work folder, the 1-GPU job first: setup,
  page cache and compile cache are the same for both, and the 2-GPU job uses the first two
  GPUs, the 1-GPU job the first.
- The speed-up compares the last run of each job (``--viral-runs 2``: the second, warm compile
  cache), as the target in ``common.results`` does; a 1-GPU job of an earlier command of the
  same day and GPU counts too, since the rows merge into the day's results file.
- ``--report FILE`` prints the table from a results file without running anything (also on a
  machine without GPUs), so a committed result can be read again; a file that gathers several
  sessions (``sessions``, each in the same layout) prints one table per session.

    python benchmarks/gpu_speedup.py --work /tmp/jw --models esm2_t36_3B_UR50D
    python benchmarks/gpu_speedup.py --report benchmarks/results/job_wall-20261130-nvidia-h200.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import engine_steady
from common.cli_job import cli_flags
from common.machine import gpu_machine, visible_gpus
from common.options import invocation, job_parser, parse
from common.results import TWO_GPU_SPEEDUP_TARGET, pick, save, short, speedup
from common.tables import fmt, targets_table
from common.work import open_work, prepare


def speedup_table(rows: list[dict]) -> list[str]:
    """Per model with ``viral`` on 1 and 2 GPUs: wall and steady speed-up, phase by phase.

    Parameters
    ----------
    rows
        A results file's job rows.

    Returns
    -------
    list of str
        A summary line per model, then its phases (1 GPU, 2 GPUs, saved); ``-`` where a
        figure is missing.
    """
    lines = [
        f"{'model':<6} {'1 GPU s':>8} {'2 GPU s':>8} {'wall x':>7} {'target':>7} "
        f"{'steady 1':>10} {'steady 2':>10} {'steady x':>8}"
    ]
    details = []
    for model in dict.fromkeys(r["model"] for r in rows):
        one, two = pick(rows, model, "viral", 1), pick(rows, model, "viral", 2)
        if one is None or two is None:
            continue
        wall = speedup(rows, model)
        s1, s2 = one.get("steady_tokens_per_s"), two.get("steady_tokens_per_s")
        lines.append(
            f"{short(model):<6} {fmt(one['wall_seconds'], '.1f'):>8} "
            f"{fmt(two['wall_seconds'], '.1f'):>8} {fmt(wall, '.2f'):>7} "
            f"{TWO_GPU_SPEEDUP_TARGET:>7.2f} {fmt(s1, ',.0f'):>10} {fmt(s2, ',.0f'):>10} "
            f"{fmt(s2 / s1 if s1 and s2 else None, '.2f'):>8}"
        )
        details += ["", f"{short(model)} viral ({one['run']} runs): phase s, 1 GPU, 2 GPUs, saved"]
        p1, p2 = _phases(one), _phases(two)
        for phase in dict.fromkeys([*p1, *p2]):
            a, b = p1.get(phase), p2.get(phase)
            saved = a - b if a is not None and b is not None else None
            details.append(f"  {phase:<14} {fmt(a):>7} {fmt(b):>7} {fmt(saved):>7}")
    if len(lines) == 1:
        return ["no model with viral on both 1 and 2 GPUs"]
    return lines + details


def _phases(row: dict) -> dict[str, float]:
    """A job's phases as the tool logged them (the file's where not logged), and ``other``."""
    phases = dict(row.get("phases_logged") or row.get("phases") or {})
    if row.get("outside_phases_seconds") is not None:
        phases["other"] = row["outside_phases_seconds"]
    return {k: v for k, v in phases.items() if isinstance(v, int | float)}


def main(argv: list[str] | None = None) -> None:
    """Run ``viral`` on 1 and 2 GPUs per model (or read ``--report``), print the speed-ups."""
    parser = job_parser(__doc__.splitlines()[0], gpus=False, smoke=False)
    parser.add_argument(
        "--viral-runs",
        type=int,
        choices=[1, 2],
        default=1,
        help="run each viral job twice (the speed-up compares the second, warm compile cache)",
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="print the table of this results file only"
    )
    args = parse(parser, argv)
    if args.report is not None:
        result = json.loads(args.report.read_text())
        # A file that gathers several sessions keeps each in this layout under "sessions".
        for session in result.get("sessions") or [result]:
            if "what" in session:
                print(f"\n{session['what']}")
            print("\n".join(speedup_table(session["rows"])))
        return
    visible = len(visible_gpus())
    if visible < 2:
        sys.exit(f"needs 2 GPUs, {visible} visible; --report FILE reads a results file")
    work = open_work(args.work, smoke=False)
    inputs, setup = prepare(work, args.models, args.viral_sequences, args.seed)
    flags = cli_flags(work.env)
    rows: list[dict] = []
    engines: dict[str, dict] = {}
    for model in args.models:
        found, engine = engine_steady.jobs_with_engine(
            model, inputs, work, flags, args, workloads=["viral"], gpu_counts=[1, 2], smoke=False
        )
        rows += found
        if engine is not None:
            engines[model] = engine
    info = gpu_machine(work.gpus)
    dropped = sorted({"--verbose"} - flags)
    out, result = save(
        invocation("gpu_speedup", args, inputs, setup, cli_flags_dropped=dropped),
        info,
        smoke=False,
        out_json=args.out_json,
        fresh=args.fresh,
        rows=rows,
        engines=engines,
    )
    speedups = [t for t in result["targets"] if "speed-up" in t["target"]]
    print("\n".join(speedup_table(result["rows"]) + ["", *targets_table(speedups)]))


if __name__ == "__main__":
    main()
