"""Each distinct sequence once: the wall clock of runs on reads with duplicates, and of a cache.

Jobs (each the command line as a fresh process, timed from start to file on disk, as in
``job_wall.py``: ``common.cli_job``), on one GPU unless ``--smoke``:

- ``reads-0``, ``reads-30``, ``reads-60``: ``--translate six-frame`` runs on ``--reads``
  reads of 300-500 bases of which 0 %, 30 % and 60 % repeat another read of the file (the
  same number of reads, so the same input size). Every read is made of sense codons, so its
  first frame is stop-free and gives one peptide of 100-166 residues (VirNucPro's rule keeps
  stop-free frames; the other frames of random bases mostly have a stop).
- ``viral``, ``viral-cold``, ``viral-warm``: the ``viral`` set of ``job_wall.py`` (13.4 M
  tokens at its full 120,000 peptides) without a cache, with ``--cache`` into an empty cache
  (what adding the rows costs), then again: the last finds every sequence there, starts no
  cluster and loads no model.

Each row has the wall clock, the input's tokens and the distinct tokens the run embedded, the
wall tokens/s counted over all input tokens, the wall against ``reads-0``'s, and where the
time went (the phases the tool logs). Targets: ``reads-30`` at most 0.75 of ``reads-0``'s
wall, ``viral-warm`` at most 10 s. Prints a table and writes JSON to ``benchmarks/results/``.

    python benchmarks/dedup.py --work /scratch/dedup                      # GPU, 3B
    python benchmarks/dedup.py --work /tmp/dedup --smoke --model esm2_t6_8M_UR50D \\
        --reads 300 --viral 600                                           # CPU check
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from common.cli_job import cli_flags, run_job
from common.machine import describe, gpu_machine
from common.tables import fmt
from common.work import open_work, prepare
from common.workloads import MODEL_WINDOW

RESULTS = Path(__file__).resolve().parent / "results"
JOBS = ("reads-0", "reads-30", "reads-60", "viral", "viral-cold", "viral-warm")
STOPS = (b"TAA", b"TAG", b"TGA")
#: The 61 sense codons of the standard code, one a row.
SENSE = np.array(
    [list(codon) for codon in (bytes([a, b, c]) for a in b"ACGT" for b in b"ACGT" for c in b"ACGT")
     if codon not in STOPS],
    dtype=np.uint8,
)  # fmt: skip


def write_reads(path: Path, count: int, duplicates: float, seed: int) -> None:
    """``count`` reads of 300-500 bases, a share ``duplicates`` of them copies of others."""
    rng = np.random.default_rng(seed)
    distinct = count - int(round(count * duplicates))
    codons = rng.integers(100, 167, distinct)
    reads = [SENSE[rng.integers(0, len(SENSE), n)].tobytes() for n in codons.tolist()]
    copies = rng.integers(0, distinct, count - distinct)
    order = rng.permutation(count)  # the copies spread over the file
    every = reads + [reads[i] for i in copies.tolist()]
    with open(path, "wb") as f:
        f.write(b"".join(b">r%d\n%s\n" % (i, every[j]) for i, j in enumerate(order.tolist())))


def input_tokens(output: Path) -> tuple[int, int, int]:
    """Tokens of every row of an output, its rows, and its distinct rows (attributes)."""
    import h5py

    with h5py.File(output, "r") as f:
        length = f["length"][:]
        distinct = int(np.ravel(f.attrs.get("distinct_sequences", len(length)))[0])
    return int((np.minimum(length, MODEL_WINDOW) + 2).sum()), len(length), distinct


def embedded_tokens(log: Path) -> int | None:
    """The tokens the run embedded, from its summary line."""
    summary = r"distinct \([^)]*\)(?:, [\d,]+ from the cache)?, ([\d,]+) tokens in"
    found = re.findall(summary, log.read_text())
    return int(found[-1].replace(",", "")) if found else None


def main(argv: list[str] | None = None) -> Path:
    """Run the jobs, print the table, write the JSON; return its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="work folder (reused)")
    parser.add_argument("--model", default="esm2_t36_3B_UR50D")
    parser.add_argument("--reads", type=int, default=40_000)
    parser.add_argument("--viral", type=int, default=120_000, help="peptides of the viral set")
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--smoke", action="store_true", help="the CPU check (2 workers)")
    parser.add_argument("--label", default="gpu")
    args = parser.parse_args(argv)

    work = open_work(args.work, args.smoke)
    inputs, setup = prepare(work, [args.model], args.viral, args.seed)
    flags = cli_flags(work.env)
    spec = {
        "model": args.model,
        "workers": 2 if args.smoke else 1,
        "devices": None if args.smoke else work.gpus[:1],
    }
    cache = work.folder / "cache-dedup"
    if "viral-cold" in args.jobs and cache.exists():
        shutil.rmtree(cache)  # the cold run starts from an empty cache
    rows = []
    for job in args.jobs:
        if job.startswith("reads"):
            share = int(job.split("-")[1]) / 100
            fasta = work.folder / f"reads-{job.split('-')[1]}.fa"
            if not fasta.exists():
                write_reads(fasta, args.reads, share, args.seed)
            extra = ("--translate", "six-frame")
        else:
            fasta = Path(inputs["viral"]["path"])
            extra = () if job == "viral" else ("--cache", str(cache))
        output = work.folder / "out" / f"dedup-{job}.h5"
        log = work.folder / "logs" / f"dedup-{job}.log"
        print(f"  {job} ...", flush=True)
        measured = run_job(spec, fasta, output, log, work.env, flags, args.timeout, extra)
        row = {"job": job, **measured}
        if measured["returncode"] == 0:
            tokens, sequences, distinct = input_tokens(output)
            row.update(input_tokens=tokens, sequences=sequences, distinct=distinct)
            row["embedded_tokens"] = embedded_tokens(log)
            row["wall_tokens_per_s"] = tokens / measured["wall_seconds"]
        rows.append(row)
    out = RESULTS / f"dedup-{datetime.now(UTC):%Y%m%d}-{args.label}-{args.model}.json"
    if out.exists():  # the day's earlier jobs (another call) stay, unless run again
        earlier = json.loads(out.read_text())["rows"]
        rows = [r for r in earlier if r["job"] not in args.jobs] + rows
        rows.sort(key=lambda r: JOBS.index(r["job"]))
    base = next((r for r in rows if r["job"] == "reads-0" and r.get("wall_seconds")), None)
    for row in rows:
        if base and row.get("wall_seconds") and row["job"].startswith("reads"):
            row["wall_vs_reads_0"] = row["wall_seconds"] / base["wall_seconds"]

    device = "CPU (smoke)" if args.smoke else "1 GPU"
    print(f"\n{args.model}, {device}, {args.reads:,} reads, viral {args.viral:,} peptides")
    header = (
        f"{'job':<11} {'rows':>8} {'distinct':>8} {'input tok':>11} {'embedded':>11} "
        f"{'wall s':>7} {'wall tok/s':>10} {'vs 0%':>6}  phases"
    )
    print(header)
    for row in rows:
        phases = row.get("phases_logged") or {}
        where = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
        print(
            f"{row['job']:<11} {fmt(row.get('sequences'), ',d'):>8} "
            f"{fmt(row.get('distinct'), ',d'):>8} {fmt(row.get('input_tokens'), ',d'):>11} "
            f"{fmt(row.get('embedded_tokens'), ',d'):>11} {fmt(row.get('wall_seconds'), '.1f'):>7} "
            f"{fmt(row.get('wall_tokens_per_s'), ',.0f'):>10} "
            f"{fmt(row.get('wall_vs_reads_0'), '.2f'):>6}  {where}"
        )
    result = {
        "benchmark": "dedup",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe(("torch", "dask", "distributed", "numpy", "h5py")),
        "gpus": gpu_machine(work.gpus) if work.gpus else None,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "setup": setup,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
