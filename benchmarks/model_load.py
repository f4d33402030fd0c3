"""Where a worker's model load goes: imports, CUDA context, checkpoint read, transfer, engine.

Each measurement runs in a fresh Python process with ``OMP_NUM_THREADS=1`` (what Dask sets in
its workers), the checkpoint in the page cache (a first read primes it). Steps, in order:

- ``import torch`` and then fair-esm plus the packed engine (which imports torch's varlen
  attention, and with it the compiler stack);
- the CUDA context (``torch.empty(1, device="cuda")``);
- reading the checkpoint (``torch.load(mmap=True)`` and the tool's checks);
- moving the tensors to the GPU in bf16, three ways: ``cpu-cast`` (``t.to(device, dtype)``,
  which casts on the CPU before the copy: the tool's former path), ``gpu-cast`` (copy in the
  file's dtype, cast on the GPU: the tool's path now) and ``gpu-cast-8`` (the same from 8
  threads);
- ``load_model`` as a whole, and building the eager packed engine (small warm-up).

Writes ``results/model_load-<date>-<gpu>.json`` and prints a table. The checkpoints are those
of ``job_wall.py``'s setup (``WORK/torch``, fp16 like the published files)::

    python benchmarks/model_load.py --work /tmp/jw --models esm2_t33_650M_UR50D esm2_t36_3B_UR50D
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
STRATEGIES = ("cpu-cast", "gpu-cast", "gpu-cast-8")


def child(model: str, strategy: str) -> dict:
    """One fresh process: time every step of loading ``model`` with ``strategy``."""
    clock = time.perf_counter()
    times: dict[str, float] = {}

    def step(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = round(now - clock, 3)
        clock = now

    import torch

    step("import_torch")
    import esm  # noqa: F401

    import virnuc_dask.engine.packed  # noqa: F401
    from virnuc_dask.engine import build_engine
    from virnuc_dask.model.checkpoint import _checked_state, resolve_weights
    from virnuc_dask.model.loading import load_model
    from virnuc_dask.model.registry import model_spec

    step("import_esm_engine")
    device = torch.device("cuda")
    torch.empty(1, device=device)
    torch.cuda.synchronize()
    step("cuda_context")
    source = resolve_weights(model)
    path = Path(source.checkpoint)
    state, _ = _checked_state(path, model_spec(model))
    step("read")
    if strategy == "cpu-cast":
        moved = {n: t.to(device=device, dtype=torch.bfloat16, copy=True) for n, t in state.items()}
    elif strategy == "gpu-cast":
        moved = {n: t.to(device=device, copy=True).to(torch.bfloat16) for n, t in state.items()}
    else:
        from concurrent.futures import ThreadPoolExecutor

        def move(item):
            name, tensor = item
            with torch.cuda.stream(torch.cuda.Stream()):
                out = tensor.to(device=device, copy=True).to(torch.bfloat16)
                torch.cuda.current_stream().synchronize()
            return name, out

        with ThreadPoolExecutor(8) as pool:
            moved = dict(pool.map(move, state.items()))
    torch.cuda.synchronize()
    step("transfer")
    gigabytes = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
    del moved, state
    torch.cuda.empty_cache()
    step("free")
    model_obj = load_model(source, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    step("load_model")
    engine = build_engine(
        model_obj, device=device, dtype="bf16", layers=[model_obj.num_layers], compile=False
    )
    torch.cuda.synchronize()
    step("engine")
    return {
        "model": model,
        "strategy": strategy,
        "file_gb": round(path.stat().st_size / 1e9, 2),
        "tensor_gb": round(gigabytes, 2),
        "seconds": times,
        "transfer_gb_per_s": round(gigabytes / max(times["transfer"], 1e-9), 2),
        "engine_budget": engine.tokens_per_batch,
    }


def run_child(work: Path, model: str, strategy: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_HOME=str(work / "torch"))
    env["XDG_CACHE_HOME"] = str(work / "cache")
    command = [sys.executable, __file__, "--child", model, strategy]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"model": model, "strategy": strategy, "error": out.stderr.strip()[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="job_wall.py's work folder")
    parser.add_argument("--models", nargs="+", default=["esm2_t36_3B_UR50D"])
    args = parser.parse_args()
    import torch

    rows = []
    for model in args.models:
        checkpoint = args.work / "torch" / "hub" / "checkpoints" / f"{model}.pt"
        subprocess.run(["cat", str(checkpoint)], stdout=subprocess.DEVNULL, check=True)
        for strategy in STRATEGIES:
            rows.append(run_child(args.work, model, strategy))
            print(json.dumps(rows[-1]), flush=True)
    steps = ["import_torch", "import_esm_engine", "cuda_context", "read", "transfer"]
    steps += ["load_model", "engine"]
    print(f"\n| model | strategy | GB | {' | '.join(steps)} | transfer GB/s |")
    print("|---" * (len(steps) + 4) + "|")
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | {row['strategy']} | error: {row['error'][-200:]} |")
            continue
        cells = " | ".join(f"{row['seconds'][s]:.2f}" for s in steps)
        print(
            f"| {row['model']} | {row['strategy']} | {row['tensor_gb']} | {cells} | "
            f"{row['transfer_gb_per_s']} |"
        )
    gpu = torch.cuda.get_device_name(0)
    result = {
        "benchmark": "model_load",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "gpu": gpu,
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    slug = gpu.lower().replace("nvidia ", "").replace(" ", "-")
    path = RESULTS / f"model_load-{datetime.now(UTC):%Y%m%d}-{slug}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
