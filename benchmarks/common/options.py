"""The command-line flags the job benchmarks share, with the same names and defaults in each.

Decisions:

- ``job_wall.py``'s flags are the reference: a flag another job benchmark also has means the
  same there (``--work``, ``--models``, ``--seed``, ``--timeout``, ``--viral-sequences``,
  ``--out-json``, ``--fresh``, ``--smoke``, and ``--gpus`` where GPU counts are chosen), so one
  work folder and one results file serve them all.
- ``--smoke`` is the CPU check of each that has one: ESM-2 8M, 2 CPU worker processes (GPU
  count 0), the first 3,000 ``viral`` peptides, results in the temporary folder. A benchmark
  that needs two GPUs (``gpu_speedup.py``) has no CPU check and so no ``--smoke``.
- ``invocation`` records the parsed flags of every command in the results file, so a figure
  can be traced to the command that measured it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common.results import MODELS
from common.workloads import SMALL_SEQUENCES, SMOKE_VIRAL_SEQUENCES, VIRAL_SEQUENCES

SMOKE_MODEL = "esm2_t6_8M_UR50D"


def job_parser(
    description: str, *, gpus: bool = True, smoke: bool = True
) -> argparse.ArgumentParser:
    """A parser with the shared flags; a benchmark adds its own before parsing.

    Parameters
    ----------
    description
        The benchmark's one-line description (its docstring's first line).
    gpus
        Whether the benchmark takes ``--gpus`` (GPU counts; 1 by default).
    smoke
        Whether it has a CPU check (``--smoke``); one that needs two GPUs has none.

    Returns
    -------
    argparse.ArgumentParser
        Parse with ``parse`` so that ``--smoke`` and the defaults that hang on it apply.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=MODELS)
    if gpus:
        parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts per job")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "job_wall",
        help="checkpoints, inputs, outputs and logs; reused when present",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    parser.add_argument(
        "--viral-sequences",
        type=int,
        default=None,
        help=f"size of viral: its first N peptides (default {VIRAL_SEQUENCES:,}; "
        f"{SMOKE_VIRAL_SEQUENCES:,} with --smoke)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-json",
        type=Path,
        default=None,
        help="default: results/job_wall-<date>-<gpu>.json (the temporary folder with --smoke)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="replace the JSON file instead of merging into it"
    )
    if smoke:
        parser.add_argument(
            "--smoke",
            action="store_true",
            help=f"CPU: {SMOKE_MODEL}, small and {SMOKE_VIRAL_SEQUENCES:,} viral, 2 CPU workers",
        )
    else:
        parser.set_defaults(smoke=False)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` and apply ``--smoke`` and the size of ``viral``.

    Parameters
    ----------
    parser
        A parser from ``job_parser``.
    argv
        The arguments (None: ``sys.argv[1:]``).

    Returns
    -------
    argparse.Namespace
        The arguments, with ``models`` and ``gpus`` set for the CPU check under ``--smoke``
        and ``viral_sequences`` filled in.
    """
    args = parser.parse_args(argv)
    if args.smoke:
        args.models = [SMOKE_MODEL]
        if "gpus" in vars(args):
            args.gpus = [0]
    if args.viral_sequences is None:
        args.viral_sequences = SMOKE_VIRAL_SEQUENCES if args.smoke else VIRAL_SEQUENCES
    if not SMALL_SEQUENCES <= args.viral_sequences <= VIRAL_SEQUENCES:
        parser.error(f"--viral-sequences must lie in {SMALL_SEQUENCES}-{VIRAL_SEQUENCES:,}")
    return args


def invocation(script: str, args: argparse.Namespace, inputs: dict, setup: dict, **extra) -> dict:
    """What one command was, for the results file's ``invocations``.

    Parameters
    ----------
    script
        The benchmark's name (``job_wall``, ``notebook_wall``, ...).
    args
        Its parsed arguments (paths written as strings).
    inputs, setup
        ``common.work.prepare``'s inputs and setup record.
    **extra
        Further fields (``job_wall.py``: ``cli_flags_dropped``).

    Returns
    -------
    dict
        ``script``, ``args``, the fields of ``extra``, ``workloads`` (sequences and tokens)
        and ``setup``.
    """
    return {
        "script": script,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **extra,
        "workloads": {
            k: {"sequences": v["sequences"], "tokens": v["tokens"]} for k, v in inputs.items()
        },
        "setup": setup,
    }
