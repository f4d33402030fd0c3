"""Per-residue output: its cost in tokens/s, the bytes it writes, and the memory it takes.

Each job is one ``virnuc_dask.embed()`` on a fresh local cluster, in a fresh child process
whose threads sample, every 0.2 s, the resident memory of the driver (which also runs the
streaming assembly: shards are copied into the file as chunks finish, and the Zarr store is
written from it at the end) and of each worker process. Jobs on the same peptides:

- ``pooled``: the pooled vectors only (today's output);
- ``per-residue``: ``--per-residue`` (float16), HDF5 only;
- ``per-residue+zarr``: the same, plus the Zarr store.

The steady rate of a job is its tokens (residues + 2) over the run's ``compute`` phase, as the
tool records it in the output's ``phases`` attribute (first chunk submitted to last chunk
written into the file); the target is per-residue >= 90% of pooled on the GPU. The *tail* is
the time from the last chunk's end (written into the file) to the finished outputs: the
writer's ``close()`` (row check, attributes, the Zarr store's remaining writes, renames), from
its debug line ``output closed: check 0.00 s, ...``, with its steps. Bytes written
per token are the stored size of ``residue_embedding`` (HDF5) and of the Zarr store's
``residue_embedding`` folder over the tokens.

On a CUDA machine (the default) the model's weights are random but go through the real loading
path: setup writes a checkpoint in fair-esm's format into ``WORK/torch/hub/checkpoints``
(``common.checkpoints``, as ``job_wall.py`` writes them) and the jobs run with
``TORCH_HOME=WORK/torch``. ``--cpu`` runs
ESM-2 8M with ``random_weights=True`` on a CPU cluster: the memory stand-in for a large run.
Peptides are random residues, lengths uniform in 50-170 (the ``viral`` workload of
``job_wall.py``). Each job runs in a fresh child process (``common.children``).

    python benchmarks/per_residue.py --work /tmp/pr --model esm2_t36_3B_UR50D --sequences 120000
    python benchmarks/per_residue.py --cpu --work /tmp/pr --sequences 12000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from common.checkpoints import child_checkpoint
from common.children import child
from common.machine import describe

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
LENGTHS = (50, 170)
JOBS = {
    "pooled": {},
    "per-residue": {"per_residue": True},
    "per-residue+zarr": {"per_residue": True, "zarr": True},
}
#: The versions recorded with the results.
PACKAGES = ("virnuc-dask", "torch", "fair-esm", "dask", "distributed", "h5py", "zarr", "xarray")
TARGET = 0.90


def write_peptides(path: Path, count: int, seed: int = 0) -> int:
    """Write ``count`` random peptides (lengths uniform in 50-170) as FASTA; return tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(LENGTHS[0], LENGTHS[1] + 1, count)
    if not path.exists():
        residues = AMINO[rng.integers(0, len(AMINO), int(lengths.sum()))]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        partial = path.with_suffix(".partial")
        with open(partial, "wb") as f:
            for i in range(count):
                f.write(b">p%d\n%s\n" % (i, residues[starts[i] : starts[i + 1]].tobytes()))
        partial.replace(path)
    return int(lengths.sum() + 2 * count)


class MemorySampler:
    """Peak resident memory of this process and of its descendants, sampled in a thread."""

    def __init__(self, period: float = 0.2) -> None:
        import psutil

        self.process = psutil.Process()
        self.period = period
        self.samples: list[tuple[float, int, int]] = []  # (time, driver, largest worker)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            driver = self.process.memory_info().rss
            workers = 0
            for descendant in self.process.children(recursive=True):
                try:
                    workers = max(workers, descendant.memory_info().rss)
                except psutil.Error:
                    continue
            self.samples.append((time.perf_counter(), driver, workers))
            self._stop.wait(self.period)

    def peaks(self, since: float | None = None) -> tuple[int, int]:
        """Peak driver and worker memory (bytes), over all samples or those after ``since``."""
        chosen = [s for s in self.samples if since is None or s[0] >= since] or self.samples
        return max(s[1] for s in chosen), max(s[2] for s in chosen)


class TailSteps(logging.Handler):
    """The steps of the writer's ``close()``, from its debug line, in seconds."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.steps: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("output closed: "):
            found = re.findall(r"(\w+) ([\d.]+) s", message)
            self.steps = {name: float(seconds) for name, seconds in found}


def child_job(spec: dict) -> dict:
    """One job in this (fresh) process: embed, sample memory, measure the output."""
    import h5py

    import virnuc_dask

    work = Path(spec["work"])
    out = work / f"{spec['name']}.h5"
    store = work / f"{spec['name']}.zarr" if spec.get("zarr") else None
    settings = dict(model=spec["model"], workers=spec["workers"], overwrite=True, progress=False)
    if spec.get("random_weights"):
        settings["random_weights"] = True
    if spec.get("per_residue"):
        settings["per_residue"] = True
    tail = TailSteps()
    writer_log = logging.getLogger("virnuc_dask.output.writer")
    writer_log.setLevel(logging.DEBUG)
    writer_log.addHandler(tail)
    with MemorySampler() as sampler:
        started = time.perf_counter()
        virnuc_dask.embed(spec["fasta"], out, zarr=store, **settings)
        wall = time.perf_counter() - started
    writer_log.removeHandler(tail)
    with h5py.File(out, "r") as f:
        phases = json.loads(f.attrs["phases"])
        stored = f["residue_embedding"].id.get_storage_size() if "residue_embedding" in f else 0
        raw = f["residue_embedding"].nbytes if "residue_embedding" in f else 0
        rows = f["residue_embedding"].shape[0] if "residue_embedding" in f else 0
    # The tail: after the last chunk was written into the file (check, Zarr, rename, close).
    before_tail = sum(phases.get(k, 0.0) for k in ("index", "cluster_start", "model_load"))
    before_tail += phases.get("compile", 0.0) + phases.get("compute", 0.0)
    driver, workers = sampler.peaks()
    tail_driver, _ = sampler.peaks(since=started + before_tail)
    zarr_bytes = 0
    if store is not None:
        folder = store / "residue_embedding"
        zarr_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    tokens = spec["tokens"]
    result = {
        "job": spec["name"],
        "wall_seconds": round(wall, 2),
        "phases": phases,
        "steady_tokens_per_second": round(tokens / phases["compute"], 1),
        "tail_seconds": round(sum(tail.steps.values()), 2),
        "tail_steps": tail.steps,
        "peak_driver_bytes": driver,
        "peak_driver_tail_bytes": tail_driver,
        "peak_worker_bytes": workers,
        "output_bytes": out.stat().st_size,
        "residue_rows": rows,
        "residue_raw_bytes": raw,
        "residue_stored_bytes": stored,
        "residue_stored_bytes_per_token": round(stored / tokens, 1) if stored else 0,
        "zarr_residue_bytes": zarr_bytes,
        "zarr_residue_bytes_per_token": round(zarr_bytes / tokens, 1) if zarr_bytes else 0,
    }
    for path in (out, store):
        if path is not None and path.exists():
            subprocess.run(["rm", "-rf", str(path)], check=True)
    return result


def run_child(spec: dict, env: dict) -> dict:
    """``child_job`` in a fresh process; a failed job ends the benchmark."""
    result = child(child_job, env, None, spec=spec)
    if "error" in result:
        raise RuntimeError(f"job {spec['name']} failed: {result['error']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--cpu", action="store_true", help="ESM-2 8M, random weights, CPU.")
    parser.add_argument("--model", default=None)
    parser.add_argument("--sequences", type=int, default=120_000)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument(
        "--label", default="", help="Added to the results' name and recorded (e.g. before)."
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or ("esm2_t6_8M_UR50D" if args.cpu else "esm2_t36_3B_UR50D")
    env = dict(os.environ)
    if not args.cpu:
        env["TORCH_HOME"] = str(args.work / "torch")
        env["XDG_CACHE_HOME"] = str(args.work / "cache")
        # The checkpoint of seeded random weights in fair-esm's format, as job_wall.py's.
        made = child(child_checkpoint, env, None, model=model, seed=0)
        print(json.dumps(made), flush=True)
        if "error" in made:
            sys.exit(f"checkpoint of {model} failed: {made['error']}")
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    fasta = args.work / f"peptides-{args.sequences}.fasta"
    tokens = write_peptides(fasta, args.sequences)
    print(f"{args.sequences:,} peptides, {tokens:,} tokens, model {model}", flush=True)
    rows = []
    for name in args.jobs:
        spec = {
            "name": name,
            "work": str(args.work),
            "fasta": str(fasta),
            "tokens": tokens,
            "model": model,
            "workers": args.workers,
            "random_weights": args.cpu,
            **JOBS[name],
        }
        result = run_child(spec, env)
        rows.append(result)
        print(json.dumps(result), flush=True)
    pooled = next((r for r in rows if r["job"] == "pooled"), None)
    mb = 1 / 2**20
    print(
        "\n| job | steady tok/s | vs pooled | wall s | tail s | driver peak MiB | tail peak MiB | "
        "worker peak MiB | residue bytes/token (HDF5, Zarr) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["steady_tokens_per_second"] / pooled["steady_tokens_per_second"] if pooled else 0
        r["ratio_to_pooled"] = round(ratio, 3)
        print(
            f"| {r['job']} | {r['steady_tokens_per_second']:,.0f} | {ratio:.1%} | "
            f"{r['wall_seconds']:.1f} | {r['tail_seconds']:.2f} | "
            f"{r['peak_driver_bytes'] * mb:,.0f} | "
            f"{r['peak_driver_tail_bytes'] * mb:,.0f} | {r['peak_worker_bytes'] * mb:,.0f} | "
            f"{r['residue_stored_bytes_per_token']}, {r['zarr_residue_bytes_per_token']} |"
        )
    per = next((r for r in rows if r["job"] == "per-residue"), None)
    verdict = None
    if pooled and per and not args.cpu:
        verdict = per["ratio_to_pooled"] >= TARGET
        print(f"\nper-residue >= {TARGET:.0%} of pooled: {'met' if verdict else 'missed'}")
    RESULTS.mkdir(exist_ok=True)
    kind = "cpu" if args.cpu else "gpu"
    label = f"-{args.label}" if args.label else ""
    name = f"per_residue-{datetime.now(UTC):%Y%m%d}-{kind}-{model}{label}.json"
    (RESULTS / name).write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": describe(PACKAGES),
                "model": model,
                "label": args.label,
                "sequences": args.sequences,
                "tokens": tokens,
                "target_ratio": TARGET,
                "target_met": verdict,
                "jobs": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
