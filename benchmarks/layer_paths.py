"""The packed layer three ways: eager torch, fused Triton kernels, and ``torch.compile``.

Each row is a fresh process, as a new Dask worker is (``OMP_NUM_THREADS=1``): the seconds to
import what the path needs, to build its engine and run the warm-up batch (for the compiled
path, compiling from the cache, or cold on its first row), the steady rate on viral peptides
and on proteome-like lengths, and the pooled vectors of 500 sequences against the eager torch
path's. What it decides: whether the fused path keeps the compiled path's speed while starting
as fast as the eager one.

    python benchmarks/layer_paths.py --model esm2_t36_3B_UR50D --work /tmp/paths

Writes ``results/layer_paths-<date>-<model>.json`` and prints a table. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from common.machine import describe

HERE = Path(__file__).resolve().parent
PATHS = ("eager", "fused", "compiled")


def child(path: str, model: str, work: Path, viral: int, proteome: int) -> dict:
    """One row, in this (fresh) process."""
    started = time.perf_counter()
    import numpy as np
    import torch
    from compile_start import random_model, steady, workload

    from virnuc_dask.engine.packed import PackedEngine

    if path == "fused":
        import virnuc_dask.engine.kernels  # noqa: F401  (Triton: part of this path's import)
    if path == "compiled":
        import torch._dynamo  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401
    row = {"import_s": time.perf_counter() - started}
    torch.empty(1, device="cuda")
    model = random_model(model)
    clock = time.perf_counter()
    engine = PackedEngine(
        model, layers=[model.num_layers], compile=path == "compiled", fused=path == "fused"
    )
    torch.cuda.synchronize()
    row["engine_s"] = time.perf_counter() - clock
    rng = np.random.default_rng(2)
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    lengths = np.clip(rng.lognormal(np.log(300), 0.6, proteome), 30, 1022).astype(int)
    sets = {
        "viral": workload(viral),
        "proteome": [letters[rng.integers(0, 20, n)].tobytes() for n in lengths],
    }
    for name, sequences in sets.items():
        row[f"{name}_tok_s"] = steady(engine, sequences, warm_up=500)
    np.save(work / f"{path}.npy", engine.embed(sets["viral"][:500]))
    row["process_s"] = time.perf_counter() - started
    return row


def compare(work: Path, path: str) -> dict:
    """Pooled vectors of ``path`` against the eager torch path's: min cosine, max rel. error."""
    import numpy as np

    ours = np.load(work / f"{path}.npy")[:, 0].astype(np.float64)
    base = np.load(work / "eager.npy")[:, 0].astype(np.float64)
    cosine = (ours * base).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(base, axis=1)
    error = np.abs(ours - base).max() / np.abs(base).max()
    return {"min_cosine_vs_eager": float(cosine.min()), "max_rel_error_vs_eager": float(error)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="esm2_t36_3B_UR50D")
    parser.add_argument("--work", type=Path, default=Path("/tmp/layer-paths"))
    parser.add_argument("--viral", type=int, default=10000, help="viral peptides per rate")
    parser.add_argument("--proteome", type=int, default=2000, help="proteins per rate")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        row = child(args.child, args.model, args.work, args.viral, args.proteome)
        print(json.dumps(row), flush=True)
        return
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(args.work / "inductor"),
        "TRITON_CACHE_DIR": str(args.work / "triton"),
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    rows = []
    # The eager row first (the yardstick), then each path cold and warm (its caches empty,
    # then filled by the row before).
    for path, cache in [
        ("eager", "n/a"),
        ("fused", "cold"),
        ("fused", "warm"),
        ("compiled", "cold"),
        ("compiled", "warm"),
    ]:
        command = [sys.executable, __file__, "--child", path, "--model", args.model]
        command += ["--work", str(args.work), "--viral", str(args.viral)]
        command += ["--proteome", str(args.proteome)]
        clock = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.stderr.write(done.stderr[-3000:])
            raise SystemExit(f"{path} ({cache}) failed")
        row = {"path": path, "cache": cache, **json.loads(done.stdout.strip().splitlines()[-1])}
        row["wall_s"] = time.perf_counter() - clock
        row.update(compare(args.work, path))
        rows.append(row)
    compiled = {r["cache"]: r for r in rows if r["path"] == "compiled"}["warm"]
    print(f"\n{args.model}: the packed layer three ways (fresh process per row)\n")
    print(
        "| path | cache | import s | engine s | viral tok/s | proteome tok/s "
        "| viral vs compiled | min cosine vs eager | process s |"
    )
    print("|" + "---|" * 9)
    for r in rows:
        ratio = r["viral_tok_s"] / compiled["viral_tok_s"]
        print(
            f"| {r['path']} | {r['cache']} | {r['import_s']:.1f} | {r['engine_s']:.1f} | "
            f"{r['viral_tok_s']:,.0f} | {r['proteome_tok_s']:,.0f} | {ratio:.1%} | "
            f"{r['min_cosine_vs_eager']:.6f} | {r['process_s']:.1f} |"
        )
    result = {
        "benchmark": "layer_paths",
        "date": date.today().isoformat(),
        "machine": describe(("torch", "triton", "fair-esm")),
        "command": " ".join(sys.argv),
        "model": args.model,
        "rows": rows,
    }
    out = HERE / "results" / f"layer_paths-{date.today():%Y%m%d}-{args.model}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
