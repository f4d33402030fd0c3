"""Scaling of the end-to-end job (FASTA in, HDF5 out, through the Dask graph) over workers.

For each worker count, a fresh local cluster (``LocalCUDACluster`` with that many GPUs, or a
``LocalCluster`` of CPU worker processes with ``--cpu``) runs: a small warm-up job that loads
the model on every worker (and compiles it on GPU), then the measured job. Steady-state tokens/s
is the measured job alone (index, partition, all chunk tasks, assembly); the total wall time also
counts cluster start and warm-up. Prints a table and writes JSON to ``benchmarks/results/``.

    python benchmarks/scaling.py --gpus 1 2 --model esm2_t36_3B_UR50D --workload viral
    python benchmarks/scaling.py --cpu --workers 1 2 4 --model esm2_t2_tiny --sequences 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)


def workload_lengths(name: str, count: int, seed: int) -> np.ndarray:
    """Residue counts: ``viral`` uniform in 60-170 (the peer figures' definition), ``proteome``
    as in ``gpu_throughput.py``. Only lengths matter to scaling, so no reads are translated."""
    rng = np.random.default_rng(seed)
    if name == "viral":  # six-frame peptides of 300-500 bp reads: 60-170 residues
        return rng.integers(60, 171, count)
    if name == "proteome":  # log-normal, median 300, clipped to the model window
        return np.clip(rng.lognormal(np.log(300), 0.6, count), 30, 1022).astype(np.int64)
    raise ValueError(f"unknown workload {name}")


def write_fasta(path: Path, lengths: np.ndarray, seed: int) -> int:
    """Write random proteins of the given lengths; return their tokens (residues + 2)."""
    rng = np.random.default_rng(seed + 1)
    with open(path, "wb") as f:
        for i, n in enumerate(lengths.tolist()):
            f.write(b">s%d\n" % i + AMINO[rng.integers(0, 20, n)].tobytes() + b"\n")
    return int((np.minimum(lengths, 1022) + 2).sum())


def measure(workers: int, cpu: bool, fasta: Path, warmup: Path, folder: Path, args) -> dict:
    """One cluster of ``workers``: warm up, then time the measured job."""
    from distributed import Client, LocalCluster

    import virnuc_dask

    settings = dict(
        model=args.model,
        random_weights=True,
        dtype=args.dtype,
        chunk_tokens=args.chunk_tokens,
        tokens_per_batch=args.tokens_per_batch,
    )
    started = time.perf_counter()
    if cpu:
        threads = max(1, (os.cpu_count() or 1) // workers)
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0"
        )
        extra = {"torch_threads": threads}
    else:
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(
            CUDA_VISIBLE_DEVICES=list(range(workers)), host="127.0.0.1", dashboard_address=":0"
        )
        extra = {"on_gpu": True}
    with cluster, Client(cluster) as client:
        cluster_seconds = time.perf_counter() - started
        warm = virnuc_dask.prepare(
            [warmup], folder / f"warm-{workers}.h5", lanes=workers, **extra, **settings
        )
        warm.run(client, progress=False)
        warm_seconds = time.perf_counter() - started - cluster_seconds
        t0 = time.perf_counter()
        job = virnuc_dask.prepare(
            [fasta], folder / f"out-{workers}.h5", lanes=workers, **extra, **settings
        )
        job.run(client, progress=False)
        steady = time.perf_counter() - t0
    total = time.perf_counter() - started
    return {
        "workers": workers,
        "tokens": job.report.tokens,
        "sequences": job.report.sequences,
        "chunks": job.report.chunks,
        "steady_seconds": steady,
        "steady_tokens_per_s": job.report.tokens / steady,
        "cluster_start_seconds": cluster_seconds,
        "warmup_seconds": warm_seconds,
        "total_seconds": total,
        "lane_balance": job.partition.balance(),
        "worker_tokens": job.report.worker_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="CPU worker processes, not GPUs")
    parser.add_argument("--workers", "--gpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="esm2_t36_3B_UR50D")
    parser.add_argument("--workload", choices=["viral", "proteome"], default="viral")
    parser.add_argument("--sequences", type=int, default=100_000)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--chunk-tokens", type=int, default=None)
    parser.add_argument("--tokens-per-batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fasta, warmup = folder / "in.fasta", folder / "warmup.fasta"
        tokens = write_fasta(
            fasta, workload_lengths(args.workload, args.sequences, args.seed), args.seed
        )
        write_fasta(warmup, workload_lengths(args.workload, 64 * max(args.workers), 99), 99)
        for workers in args.workers:
            rows.append(measure(workers, args.cpu, fasta, warmup, folder, args))
            rows[-1].update(
                agreement(folder / f"out-{args.workers[0]}.h5", folder / f"out-{workers}.h5")
            )
            print(f"{workers} workers: {rows[-1]['steady_tokens_per_s']:,.0f} tokens/s", flush=True)

    base = rows[0]["steady_tokens_per_s"] / rows[0]["workers"]
    print(f"\n{args.model}, {args.workload}, {args.sequences:,} sequences, {tokens:,} tokens")
    print(
        f"{'workers':>7} {'tokens/s':>12} {'speed-up':>9} {'efficiency':>10} "
        f"{'steady s':>9} {'total s':>8} {'balance':>8} {'min cos':>9} {'max err':>8}"
    )
    for row in rows:
        speedup = row["steady_tokens_per_s"] / rows[0]["steady_tokens_per_s"]
        row["speedup"] = speedup
        row["efficiency"] = row["steady_tokens_per_s"] / (base * row["workers"])
        print(
            f"{row['workers']:>7} {row['steady_tokens_per_s']:>12,.0f} {speedup:>8.2f}x "
            f"{row['efficiency']:>9.1%} {row['steady_seconds']:>9.1f} "
            f"{row['total_seconds']:>8.1f} {row['lane_balance']:>8.3f} "
            f"{row['min_cosine_vs_first']:>9.6f} {row['max_rel_error_vs_first']:>8.4f}"
        )

    result = {
        "benchmark": "scaling",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(args.cpu),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    out = args.out or RESULTS / (
        f"scaling-{'cpu' if args.cpu else 'gpu'}-{args.model}-"
        f"{args.workload}-{datetime.now(UTC):%Y%m%d}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")


def agreement(first: Path, other: Path) -> dict:
    """How closely two runs' outputs agree: same ids in the same order, row cosine and error."""
    import virnuc_dask
    from virnuc_dask.engine.fidelity import row_agreement

    with virnuc_dask.open_embeddings(first) as a, virnuc_dask.open_embeddings(other) as b:
        if list(a.sequence.values) != list(b.sequence.values):
            raise AssertionError(f"{other} has other ids or another order than {first}")
        cosine, error = row_agreement(b.embedding.values, a.embedding.values)
    return {
        "min_cosine_vs_first": float(cosine.min()),
        "max_rel_error_vs_first": float(error.max()),
    }


def machine(cpu: bool) -> dict:
    """The machine and package versions, for the results file."""
    import dask
    import distributed
    import esm
    import torch

    info = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fair-esm": esm.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "numpy": np.__version__,
    }
    if not cpu and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


if __name__ == "__main__":
    main()
