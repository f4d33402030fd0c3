"""Assembly of the final file: the work left after the last chunk, while the GPUs wait.

For each size (rows x features of float32: 120,000 x 2,560 = 1.2 GB, ESM-2 3B's width; and
100,000 x 1,280, 650M's), synthetic shards are written as chunk tasks write them (rows dealt by
a random permutation, so every shard's rows are spread over the file), and the same shards are
assembled two ways:

- ``writer``: :class:`virnuc_dask.output.OutputWriter`, as the pipeline drives it. Creating it
  (layout, reserved blocks) happens when the run starts, every ``add()`` while the workers
  compute (the shards arrive in a random order); only ``close()`` is left after the last chunk:
  the *tail*.
- ``staged``: the assembly this replaced (commit 77b2546's ``assemble``, loaded from the git
  history): every shard scattered into a staging memory map, then xarray writing the netCDF
  file block by block. All of it ran after the last chunk: its tail is its whole time.

Before each timed run the page cache is written back (``os.sync``), so that no run pays for the
previous one's dirty pages; the shards, just written, are read from the page cache, as the
driver reads a shard that a worker has just written. Every output is checked bit for bit
against the shards' values and ids after it is timed. Each figure is the median of
``--repeats`` runs. Prints a table and writes JSON to ``benchmarks/results/``.

    python benchmarks/assembly.py                     # both sizes, 3 repeats
    python benchmarks/assembly.py --folder /scratch   # where the files go (about 5 GB)
    python benchmarks/assembly.py --smoke             # small sizes, one repeat, JSON to tmp
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
from common.machine import describe

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
#: The commit whose ``assemble`` staged the values and then wrote the file with xarray.
STAGED_COMMIT = "77b2546"
#: (rows, width) per size; one pooled layer, float32.
SIZES = [(120_000, 2560), (100_000, 1280)]
SMOKE_SIZES = [(6_000, 256), (5_000, 128)]
LAYERS = [33]
FINGERPRINT = "benchmark"


def staged_assemble():
    """The ``assemble`` of :data:`STAGED_COMMIT`, or None without the git history."""
    try:
        source = subprocess.run(
            ["git", "show", f"{STAGED_COMMIT}:virnuc_dask/output.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    name = f"virnuc_dask_output_{STAGED_COMMIT}"
    module = types.ModuleType(name)
    # Dataclasses look their module up in sys.modules while the class is built.
    sys.modules[name] = module
    exec(compile(source, f"{STAGED_COMMIT}:virnuc_dask/output.py", "exec"), module.__dict__)
    return module.assemble


def write_shards(folder: Path, rows: int, width: int, shards: int, seed: int):
    """Write ``shards`` shards covering ``rows`` rows; return them, the ids and the values."""
    from virnuc_dask.output import ShardInfo, write_shard

    rng = np.random.default_rng(seed)
    ids = [f"read{i:07d}_F{i % 3 + 1}" for i in range(rows)]
    values = np.empty((rows, len(LAYERS), width), dtype=np.float32)
    infos = []
    for number, part in enumerate(np.array_split(rng.permutation(rows), shards)):
        block = rng.standard_normal((len(part), len(LAYERS), width), dtype=np.float32)
        values[part] = block
        path = folder / f"shard-{number:05d}.h5"
        write_shard(
            path,
            rows=part,
            ids=[ids[r] for r in part],
            embedding=block,
            fingerprint=FINGERPRINT,
            layers=LAYERS,
        )
        infos.append(ShardInfo(number, str(path), len(part), 0, "w", 0.0))
    return infos, ids, values


def check(path: Path, ids: list[str], values: np.ndarray) -> None:
    """Fail unless the file at ``path`` holds ``ids`` and ``values`` in input order, bit for bit."""
    with h5py.File(path, "r") as f:
        if f["sequence"].asstr()[:].tolist() != ids:
            raise AssertionError(f"{path}: ids differ")
        stored = f["embedding"]
        for start in range(0, len(ids), 8192):
            block = stored[start : start + 8192].reshape(-1, *values.shape[1:])
            if not np.array_equal(block, values[start : start + 8192]):
                raise AssertionError(f"{path}: rows {start} to {start + 8191} differ")


def run_writer(shards, ids, lengths, width, output: Path, seed: int) -> dict:
    """One assembly through the writer: creation, every add (in a random order), close."""
    from virnuc_dask.output import OutputWriter

    order = np.random.default_rng(seed).permutation(len(shards))
    os.sync()
    started = time.perf_counter()
    writer = OutputWriter(
        ids=ids,
        lengths=lengths,
        max_residues=1022,
        layers=LAYERS,
        width=width,
        output=output,
        attrs={"model": "benchmark"},
        fingerprint=FINGERPRINT,
    )
    created = time.perf_counter() - started
    adds = []
    for i in order:
        started = time.perf_counter()
        writer.add(shards[i])
        adds.append(time.perf_counter() - started)
    started = time.perf_counter()
    writer.close(extra_attrs={"phases": json.dumps({"compute": 1.0})})
    closed = time.perf_counter() - started
    return {
        "create_s": created,
        "add_total_s": sum(adds),
        "add_max_s": max(adds),
        "close_s": closed,
    }


def run_staged(assemble, shards, ids, lengths, output: Path, staging: Path) -> dict:
    """One assembly the earlier way: all of it after the last chunk."""
    os.sync()
    started = time.perf_counter()
    assemble(
        shards,
        ids=ids,
        lengths=lengths,
        max_residues=1022,
        layers=LAYERS,
        output=output,
        staging=staging,
        attrs={"model": "benchmark"},
        fingerprint=FINGERPRINT,
    )
    return {"assemble_s": time.perf_counter() - started}


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def measure(folder: Path, rows: int, width: int, shards: int, repeats: int, assemble) -> dict:
    """Every run of one size; the outputs are checked and removed after each."""
    started = time.perf_counter()
    infos, ids, values = write_shards(folder, rows, width, shards, seed=rows)
    lengths = np.full(rows, 150, dtype=np.int64)
    setup = time.perf_counter() - started
    output = folder / "out.h5"
    result = {"rows": rows, "width": width, "layers": len(LAYERS), "dtype": "float32"}
    result |= {"gb": values.nbytes / 1e9, "shards": shards, "setup_s": setup}
    writer_runs, staged_runs = [], []
    for repeat in range(repeats):
        writer_runs.append(run_writer(infos, ids, lengths, width, output, seed=repeat))
        check(output, ids, values)
        output.unlink()
        if assemble is not None:
            staging = folder / "staging"
            staged_runs.append(run_staged(assemble, infos, ids, lengths, output, staging))
            check(output, ids, values)
            output.unlink()
    result["writer"] = {k: median(writer_runs, k) for k in writer_runs[0]} | {"runs": writer_runs}
    if staged_runs:
        result["staged"] = {"assemble_s": median(staged_runs, "assemble_s"), "runs": staged_runs}
    for info in infos:
        os.unlink(info.path)
    return result


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'rows x width':>16} {'GB':>5} {'shards':>6} | {'create s':>8} {'all add s':>9} "
        f"{'max add s':>9} {'tail: close s':>13} | {'staged tail s':>13} {'tail ratio':>10}"
    )
    for row in rows:
        w = row["writer"]
        staged = row.get("staged", {}).get("assemble_s")
        ratio = f"{staged / w['close_s']:>9.0f}x" if staged else f"{'':>10}"
        staged_text = f"{staged:>13.2f}" if staged else f"{'n/a':>13}"
        print(
            f"{row['rows']:>8,} x {row['width']:>5,} {row['gb']:>5.2f} {row['shards']:>6} | "
            f"{w['create_s']:>8.2f} {w['add_total_s']:>9.2f} {w['add_max_s']:>9.3f} "
            f"{w['close_s']:>13.3f} | {staged_text} {ratio}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=32, help="shards per size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None, help="where the files are written")
    parser.add_argument("--no-staged", action="store_true", help="skip the earlier assembly")
    parser.add_argument("--smoke", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    # Imported now, not inside the first timed run.
    import dask.array  # noqa: F401
    import h5netcdf  # noqa: F401
    import xarray  # noqa: F401

    sizes = SMOKE_SIZES if args.smoke else SIZES
    repeats = 1 if args.smoke else args.repeats
    assemble = None if args.no_staged else staged_assemble()
    if assemble is None and not args.no_staged:
        print(f"no git history with {STAGED_COMMIT}: the staged assembly is not measured")

    folder = args.folder or Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    # Shards, the output, and for the staged assembly its staging array and its output.
    needed = max(r * w for r, w in sizes) * len(LAYERS) * 4 * (4 if assemble else 2) * 1.1
    free = shutil.disk_usage(folder).free
    if free < needed:
        sys.exit(f"{folder} has {free / 1e9:.1f} GB free, the benchmark needs {needed / 1e9:.1f}")
    rows = []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for count, width in sizes:
            print(f"{count:,} x {width:,} ...", flush=True)
            rows.append(measure(Path(tmp), count, width, args.shards, repeats, assemble))
    print_table(rows)

    result = {
        "benchmark": "assembly",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            **describe(("numpy", "h5py", "h5netcdf", "xarray", "dask", "zarr")),
            "hdf5": h5py.version.hdf5_version,
        },
        "args": {"shards": args.shards, "repeats": repeats, "smoke": args.smoke},
        "staged_commit": STAGED_COMMIT if assemble else None,
        "rows": rows,
    }
    name = f"assembly-{datetime.now(UTC):%Y-%m-%d}-cpu.json"
    out = args.out or (Path(tempfile.gettempdir()) if args.smoke else RESULTS) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
