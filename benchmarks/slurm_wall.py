"""What ``--cluster slurm`` costs by the wall clock, against a local cluster of as many workers.

Starts the single-node Slurm of the tests (``tests/slurm.py``: munge, slurmctld and slurmd of
Debian's packages, in a temporary folder) and runs the same command line twice per workload, as
fresh processes timed from start to file on disk (``common.cli_job``): once on a local cluster of
``--workers`` CPU workers, once on as many CPU worker jobs of one core each (``--cluster slurm
--slurm-gpus 0``). ESM-2 8M with random weights: the question is what the jobs add (submission,
a worker process per job, the model loaded on joining, cancelling), not the engine. The phases
the tool logs with ``--verbose`` say where each job's time went; ``cluster_start`` of a Slurm run
is the scheduler's start and the jobs' submission, the workers' own start falls into
``model_load`` and ``compute`` (they join while the run waits).

    python benchmarks/slurm_wall.py --work /tmp/sw
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from common.cli_job import cli_flags, run_job
from common.machine import describe
from common.workloads import peptides, tokens_of

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "esm2_t6_8M_UR50D"
WORKLOADS = {"small": 100, "3k": 3_000}


def write_workloads(work: Path) -> dict[str, tuple[Path, int]]:
    """One FASTA per workload (the first N of the ``viral`` set); paths and token counts."""
    found = {}
    for name, count in WORKLOADS.items():
        sequences = peptides(count, seed=0)
        path = work / f"{name}.fasta"
        path.write_bytes(b"".join(b">p%d\n%s\n" % (i, s) for i, s in enumerate(sequences)))
        found[name] = (path, tokens_of(sequences))
    return found


def main() -> None:
    """Run the jobs, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="Work folder (default: temporary).")
    parser.add_argument("--workers", type=int, default=2, help="Workers, local and as jobs.")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.slurm import JOBQUEUE_YAML, slurm_cluster

    work = args.work or Path(tempfile.mkdtemp(prefix="slurm-wall-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "dask").mkdir(exist_ok=True)
    (work / "dask" / "jobqueue.yaml").write_text(JOBQUEUE_YAML)
    inputs = write_workloads(work)
    rows = []
    with slurm_cluster(work / "slurm") as slurm:
        env = {**slurm.env, "DASK_CONFIG": str(work / "dask")}
        flags = cli_flags(env)
        spec = {"model": MODEL, "workers": args.workers, "devices": None}
        kinds = {
            "local": ("--random-weights",),
            "slurm": (
                "--random-weights",
                "--cluster",
                "slurm",
                "--slurm-gpus",
                "0",
                "--slurm-jobs",
                str(args.workers),
                "--slurm-memory",
                "2GB",
            ),
        }
        for workload, (fasta, tokens) in inputs.items():
            for kind, extra in kinds.items():
                print(f"  {workload} on {kind} ...", flush=True)
                out = work / f"{workload}-{kind}.h5"
                result = run_job(
                    spec,
                    fasta,
                    out,
                    work / f"{workload}-{kind}.log",
                    env,
                    flags,
                    args.timeout,
                    extra,
                )
                left = slurm.squeue_jobs()
                rows.append(
                    {
                        "workload": workload,
                        "cluster": kind,
                        "tokens": tokens,
                        **result,
                        "jobs_left_after": left,
                    }
                )
    print_table(rows)
    stamp = datetime.now(UTC)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"slurm_wall-{stamp:%Y%m%d}-cpu.json"
    content = {
        "script": "benchmarks/slurm_wall.py",
        "args": vars(args) | {"work": str(args.work) if args.work else None},
        "date": stamp.isoformat(timespec="seconds"),
        "machine": describe(("torch", "dask", "distributed", "dask-jobqueue", "fair-esm")),
        "slurm": slurm_version(),
        "rows": rows,
    }
    path.write_text(json.dumps(content, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


PHASES = ("index", "cluster_start", "model_load", "compute", "assembly", "close")


def print_table(rows: list[dict]) -> None:
    """Wall clock, wall tokens/s and the logged phases of each job."""
    head = f"{'workload':<8} {'cluster':<7} {'wall s':>7} {'tok/s':>7} " + " ".join(
        f"{p[:11]:>11}" for p in PHASES
    )
    print(head + f" {'outside':>8} {'jobs left':>9}")
    for r in rows:
        wall = r.get("wall_seconds")
        logged = r.get("phases_logged") or {}
        cells = " ".join(f"{logged.get(p, float('nan')):>11.1f}" for p in PHASES)
        rate = r["tokens"] / wall if wall else float("nan")
        outside = r.get("outside_phases_seconds", float("nan"))
        print(
            f"{r['workload']:<8} {r['cluster']:<7} {wall or float('nan'):>7.1f} {rate:>7,.0f} "
            f"{cells} {outside:>8.1f} {len(r['jobs_left_after']):>9}"
        )


def slurm_version() -> str:
    """``sbatch --version``'s answer."""
    import subprocess

    done = subprocess.run(["sbatch", "--version"], capture_output=True, text=True)
    return done.stdout.strip()


if __name__ == "__main__":
    main()
