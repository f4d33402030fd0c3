"""What a user waits for: the whole ``virnuc-dask embed`` command, from start to file on disk.

Each job is the command line run as a fresh process (``python -m virnuc_dask.cli embed IN -o
OUT --model NAME --workers N --overwrite --verbose``) with the first N GPUs visible, timed with
``time.perf_counter()`` around the process: interpreter start, imports, indexing, cluster
start, model load, compile, compute, assembly and the cluster's close all count, as they do for
the user (``common.cli_job``). The GPU utilisation is sampled every second meanwhile
(``nvidia-smi``); busy seconds are the share of samples above 0 % of the wall time. The phases
the tool logs with ``--verbose`` are kept, and what they leave of the wall time (interpreter,
imports, exit). Each job's wall tokens/s is set against the engine's steady rate per model and
GPU count: the targets are a short wall clock for ``small`` and a wall/steady ratio close to 1
for ``viral``.

Decisions:

- Weights are loaded by name through the real loading path, not ``--random-weights``: setup
  writes random-weight checkpoints in fair-esm's format into ``WORK/torch/hub/checkpoints``
  (``common.checkpoints``: seeded, drawn on the GPU, fp16 like the published files) and every
  job runs with ``TORCH_HOME=WORK/torch`` and ``XDG_CACHE_HOME=WORK/cache`` (``common.work``),
  where setup has already computed the checkpoint digest a user pays once per downloaded file.
- Small jobs run twice; the second (warm page cache, warm compile cache) is the one the
  targets judge. Both are recorded. ``viral`` jobs run once (``--viral-runs 2``: twice); the
  first job of a model in a fresh ``WORK`` that compiles pays the cold compile, which its
  ``compile`` phase shows.
- The steady rate a job is compared with is the engine's own, in the same session: tokens over
  the compute phase when the output file records its phases (attribute ``phases``), else the
  packed engine alone over the ``viral`` set in a fresh process (``engine_steady.py``; one GPU
  only: a 2-GPU rate is never assumed to be twice the 1-GPU one).
- The other questions about the same jobs have their own scripts, which this one calls for
  ``--cases notebook`` so that its flags keep working: ``notebook_wall.py`` (a second
  ``embed()`` on a resident cluster), ``engine_steady.py`` (the engine alone) and
  ``gpu_speedup.py`` (what a second GPU buys by the wall clock, phase by phase).
- CLI flags the installed tool lacks (``--verbose``) are dropped after reading ``--help``.
- Results of one day and GPU go to one JSON file, merged (``common.results``): runs split over
  several commands (to fit a time limit per command) give one table, and the 2-GPU speed-up can
  compare a 2-GPU job with a 1-GPU job of an earlier command. A job measured again replaces its
  row.

Workloads: ``viral`` = 120,000 random peptides of 50-170 residues, uniform lengths (13.4 M
tokens, tokens = residues + 2); ``small`` = its first 100 (``common.workloads``). ``--smoke``
runs the 8M model on the CPU with one local cluster of 2 worker processes, ``small`` and the
first 3,000 of ``viral``.

    python benchmarks/job_wall.py --work /tmp/jw --models esm2_t36_3B_UR50D --gpus 1 2
    python benchmarks/job_wall.py --smoke --work /tmp/jw
"""

from __future__ import annotations

import argparse
from pathlib import Path

import engine_steady
import notebook_wall
from common.cli_job import cli_flags
from common.machine import gpu_machine
from common.options import invocation, job_parser, parse
from common.results import save
from common.tables import table
from common.work import open_work, prepare
from common.workloads import WORKLOADS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags: the job benchmarks' shared ones (``common.options``) and this script's own.

    Parameters
    ----------
    argv
        The arguments (None: ``sys.argv[1:]``).

    Returns
    -------
    argparse.Namespace
        The parsed arguments, ``--smoke`` applied.
    """
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS)
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=["jobs", "notebook"],
        default=["jobs", "notebook"],
        help="command-line jobs, the notebook case (notebook_wall.py), or both",
    )
    parser.add_argument("--setup-only", action="store_true", help="write checkpoints and inputs")
    parser.add_argument(
        "--viral-runs",
        type=int,
        choices=[1, 2],
        default=1,
        help="run each viral job twice (the targets judge the second, warm compile cache)",
    )
    return parse(parser, argv)


def main(argv: list[str] | None = None) -> Path | None:
    """Set up, run every job (and the notebook case), merge into the day's results file.

    Parameters
    ----------
    argv
        The arguments (None: ``sys.argv[1:]``).

    Returns
    -------
    Path or None
        The results file; None with ``--setup-only``.
    """
    args = parse_args(argv)
    work = open_work(args.work, args.smoke)
    inputs, setup = prepare(work, args.models, args.viral_sequences, args.seed)
    if args.setup_only:
        return None

    flags = cli_flags(work.env)
    if "--verbose" not in flags:
        print("the CLI has no --verbose: jobs run without it")
    rows: list[dict] = []
    engines: dict[str, dict] = {}
    notebooks: list[dict] = []
    for model in args.models:
        if "jobs" in args.cases:
            found, engine = engine_steady.jobs_with_engine(
                model,
                inputs,
                work,
                flags,
                args,
                workloads=args.workloads,
                gpu_counts=args.gpus,
                smoke=args.smoke,
            )
            rows += found
            if engine is not None:
                engines[model] = engine
        if "notebook" in args.cases:
            notebooks.append(notebook_wall.measure(model, inputs, work, args.gpus, args.timeout))

    info = gpu_machine(work.gpus)
    dropped = sorted({"--verbose"} - flags)
    out, result = save(
        invocation("job_wall", args, inputs, setup, cli_flags_dropped=dropped),
        info,
        smoke=args.smoke,
        out_json=args.out_json,
        fresh=args.fresh,
        rows=rows,
        notebooks=notebooks,
        engines=engines,
    )
    print(table(result["rows"], result["notebook"], result["targets"]))
    return out


if __name__ == "__main__":
    main()
