"""Driver-side cost of a run before any cluster: indexing the FASTA and partitioning it.

Writes N synthetic proteins (log-normal lengths, median 300, clipped to 30-1022 residues, 60
residues per line; ``--duplicates`` of them repeats of earlier ones) into a temporary FASTA,
then times each stage in a fresh subprocess so that its peak resident memory is its own:
``build_index`` over the file (with each sequence's digest), the grouping of equal digests
(``distinct``: each row's source), and ``partition`` of the distinct sequences over 8 lanes.
Prints a table and writes JSON to ``benchmarks/results/``.

    python benchmarks/index_partition.py                     # 1,000,000 sequences
    python benchmarks/index_partition.py --sequences 10000000 --lanes 8
"""

from __future__ import annotations

import argparse
import json
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
AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
WIDTH = 60


def lengths(count: int, seed: int) -> np.ndarray:
    """Log-normal residue counts, median 300, clipped to 30-1022."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(300), 0.6, count), 30, 1022).astype(np.int64)


def write_fasta(path: Path, sizes: np.ndarray, seed: int, duplicates: float = 0.0) -> None:
    """Write random proteins of the given sizes as ``WIDTH``-residue lines.

    A share ``duplicates`` of the records (chosen at random) repeats the record before it.
    """
    rng = np.random.default_rng(seed + 1)
    with open(path, "wb", buffering=1 << 24) as f:
        sequence = b""
        for start in range(0, len(sizes), 100_000):
            block = sizes[start : start + 100_000]
            pool = AMINO[rng.integers(0, len(AMINO), int(block.sum()))].tobytes()
            repeat = rng.random(len(block)) < duplicates
            position, parts = 0, []
            for i, n in enumerate(block.tolist(), start):
                if not (repeat[i - start] and sequence):
                    sequence = pool[position : position + n]
                position += n
                parts.append(b">s%d\n" % i)
                lines = range(0, len(sequence), WIDTH)
                parts.extend(sequence[k : k + WIDTH] + b"\n" for k in lines)
            f.write(b"".join(parts))


def _status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` in MB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    """Resident memory now (Linux), else the peak so far."""
    return _status_mb("VmRSS") or _peak_mb()


def _reset_peak() -> None:
    """Restart the peak count. ``ru_maxrss`` cannot be reset and, on Linux, starts at the
    parent's peak after ``fork`` + ``exec``; ``VmHWM`` belongs to this process and resets."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def stage(name: str, fasta: str, folder: str, lanes: int) -> dict:
    """Run one stage in this (fresh) process and return its wall time and memory."""
    from virnuc_dask.inputs import FastaIndex, build_index
    from virnuc_dask.plan.distinct import distinct_rows, sources
    from virnuc_dask.plan.partition import partition

    if name == "index":
        baseline = _rss_mb()
        _reset_peak()
        started = time.perf_counter()
        index = build_index([fasta])
        seconds = time.perf_counter() - started
        peak = _peak_mb()
        index.save(folder)
        extra = {"sequences": len(index), "residues": int(index.length.sum())}
    elif name == "distinct":
        digests = np.array(FastaIndex.load(folder).digests)
        baseline = _rss_mb()
        _reset_peak()
        started = time.perf_counter()
        source = sources(digests)
        seconds = time.perf_counter() - started
        peak = _peak_mb()
        np.save(Path(folder) / "sources.npy", source)
        extra = {"distinct": len(distinct_rows(source))}
    else:
        length = np.array(FastaIndex.load(folder).length)
        rows = distinct_rows(np.load(Path(folder) / "sources.npy"))
        baseline = _rss_mb()
        _reset_peak()
        started = time.perf_counter()
        parts = partition(length, lanes=lanes, rows=rows)
        seconds = time.perf_counter() - started
        peak = _peak_mb()
        extra = {"chunks": len(parts.chunks), "lane_balance": parts.balance()}
    return {
        "stage": name,
        "seconds": seconds,
        "peak_rss_mb": peak,
        "rss_growth_mb": peak - baseline,
        **extra,
    }


def run_stage(name: str, fasta: Path, folder: Path, lanes: int) -> dict:
    command = [sys.executable, __file__, "--stage", name, "--fasta", str(fasta)]
    command += ["--folder", str(folder), "--lanes", str(lanes)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1_000_000)
    parser.add_argument("--lanes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--duplicates", type=float, default=0.3, help="share of records that repeat another"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument(
        "--stage", choices=["index", "distinct", "partition"], help=argparse.SUPPRESS
    )
    parser.add_argument("--fasta", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, args.fasta, args.folder, args.lanes)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        fasta, folder = Path(tmp) / "bench.fasta", Path(tmp) / "index"
        started = time.perf_counter()
        write_fasta(fasta, lengths(args.sequences, args.seed), args.seed, args.duplicates)
        write_seconds = time.perf_counter() - started
        size_mb = fasta.stat().st_size / 1e6
        stages = ("index", "distinct", "partition")
        rows = [run_stage(name, fasta, folder, args.lanes) for name in stages]

    index = rows[0]
    index["mb_per_s"] = size_mb / index["seconds"]
    index["sequences_per_s"] = index["sequences"] / index["seconds"]
    print(
        f"\n{args.sequences:,} sequences, {index['residues']:,} residues, {size_mb:,.0f} MB "
        f"FASTA (written in {write_seconds:.1f} s), {args.lanes} lanes"
    )
    print(f"{'stage':<10} {'wall s':>8} {'peak RSS MB':>12} {'RSS growth MB':>14}  notes")
    for row in rows:
        if row["stage"] == "index":
            notes = f"{row['sequences_per_s']:,.0f} seq/s, {row['mb_per_s']:.0f} MB/s"
        elif row["stage"] == "distinct":
            notes = f"{row['distinct']:,} distinct of {index['sequences']:,}"
        else:
            notes = f"{row['chunks']:,} chunks, balance {row['lane_balance']:.4f}"
        print(
            f"{row['stage']:<10} {row['seconds']:>8.2f} {row['peak_rss_mb']:>12.0f} "
            f"{row['rss_growth_mb']:>14.0f}  {notes}"
        )

    result = {
        "benchmark": "index_partition",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe(("numpy",)),
        "args": {
            "sequences": args.sequences,
            "lanes": args.lanes,
            "seed": args.seed,
            "duplicates": args.duplicates,
        },
        "fasta_mb": size_mb,
        "write_seconds": write_seconds,
        "rows": rows,
    }
    out = args.out or RESULTS / f"index_partition-{datetime.now(UTC):%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
