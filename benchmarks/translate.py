"""Reads front end: six-frame translation of 10 million 150-bp reads, bases/s and peak memory.

Writes N reads (default 10,000,000 of 150 bases) as FASTQ and as FASTA into a temporary
folder, then times each stage in a fresh subprocess, so that its peak resident memory is its
own:

- ``translate``: :func:`~virnuc_dask.inputs.translate.translate_frames` alone, on bases
  already in memory, in batches of 100,000 reads (the numpy core);
- ``fastq``, ``fasta``, ``fastq.gz`` (with ``--gzip``): the whole front end,
  :func:`~virnuc_dask.inputs.peptides.build_peptide_index`: read (and gunzip), hash, parse,
  translate, stage the peptides, check the ids, build the index;
- ``fastq orfs``: the same with ``frames="orfs"`` (pieces of at least 30 residues).

Workload ``coding`` (default): each read is cut from a random coding sequence (sense codons
only) in a random frame and strand, so one of its six frames is stop-free and the others are
random, as reads of a viral genome are; ``random``: uniform random bases (about half a kept
frame per read). One base in 1,000 is ``N``.

Bases/s is the reads' bases over the wall time; "per CPU s" over the process's CPU time (the
front end reads ahead and translates in threads: on one core the wall time would be about its
CPU time). Prints a table and writes JSON to ``benchmarks/results/``.

    python benchmarks/translate.py                        # 10,000,000 reads, 150 bases
    python benchmarks/translate.py --reads 1000000 --gzip
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from common.machine import describe

RESULTS = Path(__file__).resolve().parent / "results"
BASES = np.frombuffer(b"ACGT", dtype=np.uint8)
COMPLEMENT = np.zeros(256, dtype=np.uint8)
COMPLEMENT[list(b"ACGTN")] = list(b"TGCAN")
SENSE = np.array(
    [list(a + b + c) for a in "ACGT" for b in "ACGT" for c in "ACGT"
     if a + b + c not in ("TAA", "TAG", "TGA")],
    dtype="S1",
).view(np.uint8)  # fmt: skip
BATCH = 100_000


def reads_block(count: int, length: int, workload: str, rng) -> np.ndarray:
    """``count`` reads of ``length`` bases, as a (count, length) uint8 array."""
    if workload == "random":
        bases = BASES[rng.integers(0, 4, (count, length))]
    else:
        codons = -(-(length + 2) // 3)
        coding = SENSE[rng.integers(0, len(SENSE), (count, codons))].reshape(count, -1)
        offset = rng.integers(0, 3, count)
        columns = offset[:, None] + np.arange(length)
        bases = np.take_along_axis(coding, columns, axis=1)
        reverse = rng.random(count) < 0.5
        bases[reverse] = COMPLEMENT[bases[reverse][:, ::-1]]
    bases[rng.random(bases.shape) < 0.001] = ord("N")
    return bases


def write_reads(fastq: Path, fasta: Path, count: int, length: int, workload: str, seed: int):
    """Write the same reads as FASTQ and FASTA, 100,000 at a time."""
    rng = np.random.default_rng(seed)
    quality = b"+\n" + b"I" * length + b"\n"
    with open(fastq, "wb", buffering=1 << 24) as fq, open(fasta, "wb", buffering=1 << 24) as fa:
        for first in range(0, count, BATCH):
            n = min(BATCH, count - first)
            bases = reads_block(n, length, workload, rng)
            lines = np.full((n, length + 1), ord("\n"), dtype=np.uint8)
            lines[:, :length] = bases
            rows = lines.tobytes()
            width = length + 1
            names = [b"read%d" % i for i in range(first, first + n)]
            fq.write(
                b"".join(
                    b"@" + name + b"\n" + rows[k * width : (k + 1) * width] + quality
                    for k, name in enumerate(names)
                )
            )
            fa.write(
                b"".join(
                    b">" + name + b"\n" + rows[k * width : (k + 1) * width]
                    for k, name in enumerate(names)
                )
            )


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # restart VmHWM from the current RSS
    except OSError:
        pass


def _peak_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stage(name: str, path: str, folder: str, frames: str) -> dict:
    """Run one stage in this (fresh) process: wall and CPU seconds, memory, counts."""
    from virnuc_dask.inputs.peptides import Translation, build_peptide_index
    from virnuc_dask.inputs.translate import CodonLookup, translate_frames

    if name == "translate":
        data = np.fromfile(path, dtype=np.uint8)  # the FASTA: a header line, a bases line
        ends = np.flatnonzero(data == 10)
        start = ends[0::2] + 1
        length = ends[1::2] - start
        count = len(start)
        lookup = CodonLookup.for_code(1)
    baseline = _status_mb("VmRSS") or _peak_mb()
    _reset_peak()
    cpu, started = _cpu_seconds(), time.perf_counter()
    if name == "translate":
        peptides = 0
        for first in range(0, count, BATCH):
            rows = slice(first, first + BATCH)
            peptides += len(translate_frames(data, start[rows], length[rows], lookup))
        reads, bases = count, int(length.sum())
    else:
        index, provenance = build_peptide_index(
            [path], Path(folder) / "staging", Translation(frames=frames)
        )
        peptides, reads = len(index), provenance.reads
        bases = None  # filled by the caller, who wrote the reads
    seconds = time.perf_counter() - started
    return {
        "stage": name + (" orfs" if frames == "orfs" else ""),
        "seconds": seconds,
        "cpu_seconds": _cpu_seconds() - cpu,
        "peak_rss_mb": _peak_mb(),
        "rss_growth_mb": _peak_mb() - baseline,
        "reads": reads,
        "bases": bases,
        "peptides": peptides,
    }


def run_stage(name: str, path: Path, folder: Path, frames: str = "stop-free") -> dict:
    command = [sys.executable, __file__, "--stage", name, "--path", str(path)]
    command += ["--folder", str(folder), "--frames", frames]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"stage {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=10_000_000)
    parser.add_argument("--length", type=int, default=150)
    parser.add_argument("--workload", choices=["coding", "random"], default="coding")
    parser.add_argument("--gzip", action="store_true", help="also time a gzip FASTQ")
    parser.add_argument("--no-orfs", action="store_true", help="skip the orfs stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--frames", default="stop-free", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, args.path, args.folder, args.frames)))
        return

    started_at = describe(("virnuc-dask", "numpy"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fastq, fasta = tmp / "reads.fastq", tmp / "reads.fasta"
        clock = time.perf_counter()
        write_reads(fastq, fasta, args.reads, args.length, args.workload, args.seed)
        write_seconds = time.perf_counter() - clock
        sizes = {"fastq_mb": fastq.stat().st_size / 1e6, "fasta_mb": fasta.stat().st_size / 1e6}
        plan = [("translate", fasta, "stop-free"), ("fastq", fastq, "stop-free")]
        if args.gzip:
            packed = tmp / "reads.fastq.gz"
            subprocess.run(f"gzip -1 -c {fastq} > {packed}", shell=True, check=True)
            sizes["fastq_gz_mb"] = packed.stat().st_size / 1e6
            plan.append(("fastq.gz", packed, "stop-free"))
        plan.append(("fasta", fasta, "stop-free"))
        if not args.no_orfs:
            plan.append(("fastq", fastq, "orfs"))
        rows = []
        for name, path, frames in plan:
            folder = tmp / f"work-{len(rows)}"
            folder.mkdir()
            row = run_stage(name, path, folder, frames)
            row["bases"] = row["bases"] or row["reads"] * args.length
            row["bases_per_s"] = row["bases"] / row["seconds"]
            row["bases_per_cpu_s"] = row["bases"] / max(row["cpu_seconds"], 1e-9)
            row["reads_per_s"] = row["reads"] / row["seconds"]
            rows.append(row)
            print(f"  {row['stage']}: {row['seconds']:.1f} s", file=sys.stderr, flush=True)

    print(
        f"\n{args.reads:,} reads of {args.length} bases ({args.workload}), "
        f"FASTQ {sizes['fastq_mb']:,.0f} MB, FASTA {sizes['fasta_mb']:,.0f} MB "
        f"(written in {write_seconds:.0f} s); {started_at['cpus']} CPUs, load average "
        f"{started_at['load_average'][0]:.1f} at the start"
    )
    header = (
        f"{'stage':<12} {'wall s':>7} {'CPU s':>7} {'M bases/s':>10} {'per CPU s':>10} "
        f"{'reads/s':>10} {'peptides':>11} {'peak MB':>8} {'growth MB':>10}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['stage']:<12} {row['seconds']:>7.1f} {row['cpu_seconds']:>7.1f} "
            f"{row['bases_per_s'] / 1e6:>10.1f} {row['bases_per_cpu_s'] / 1e6:>10.1f} "
            f"{row['reads_per_s']:>10,.0f} {row['peptides']:>11,} {row['peak_rss_mb']:>8,.0f} "
            f"{row['rss_growth_mb']:>10,.0f}"
        )
    result = {
        "benchmark": "translate",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": started_at,
        "load_average_at_end": list(os.getloadavg()),
        "args": {k: v for k, v in vars(args).items() if k not in ("stage", "path", "folder")},
        "files": sizes,
        "write_seconds": write_seconds,
        "rows": rows,
    }
    result["args"]["out"] = str(args.out) if args.out else None
    out = args.out or RESULTS / f"translate-{datetime.now(UTC):%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
