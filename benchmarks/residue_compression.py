"""How fast per-residue rows compress: deflate and Zstandard, one thread and a pool.

A worker writing ``--per-residue`` output compresses each 1,024-row chunk (byte shuffle, then
the codec) in a pool of threads while its GPU computes; this measures that step alone on
float16 rows of ESM-2 3B's width (random normal values: embeddings' mantissas are as
incompressible). ``deflate-1`` and ``zstd-1`` take rows shuffled beforehand (the shuffle is
not timed); ``shuffle+zstd-1`` is what workers did before (numpy's byte shuffle, then
Zstandard level 1) and ``blosc-zstd-1`` what they do now (``residues._compress``: Blosc,
Zstandard level 1 after its own byte shuffle, one block a chunk), both timed from raw rows.
Prints a table and writes ``results/residue_compression-<date>-<host>.json``.

    python benchmarks/residue_compression.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numcodecs import Zstd

from virnuc_dask.output.residues import _compress

RESULTS = Path(__file__).parent / "results"
CHUNKS = 48


def raw_chunk(width: int = 2560, rows: int = 1024) -> np.ndarray:
    """One storage chunk of float16 rows."""
    return np.random.default_rng(0).standard_normal((rows, width)).astype(np.float16)


def shuffle(chunk: np.ndarray) -> np.ndarray:
    """A chunk's bytes shuffled as HDF5's shuffle filter does (first bytes, then second)."""
    size = chunk.dtype.itemsize
    return np.ascontiguousarray(chunk.reshape(-1).view(np.uint8).reshape(-1, size).T)


def shuffled_chunk(width: int = 2560, rows: int = 1024) -> np.ndarray:
    """One storage chunk of float16 rows, bytes shuffled as HDF5's shuffle filter does."""
    return shuffle(raw_chunk(width, rows))


CODECS = {
    "deflate-1": lambda data: zlib.compress(data, 1),
    "zstd-1": lambda data: bytes(Zstd(level=1).encode(data)),
    "shuffle+zstd-1": lambda chunk: bytes(Zstd(level=1).encode(shuffle(chunk))),
    "blosc-zstd-1": _compress,
}
#: Codecs that shuffle the bytes themselves, given the raw rows.
RAW = {"shuffle+zstd-1", "blosc-zstd-1"}


def rate(codec, data: np.ndarray, threads: int) -> tuple[float, float]:
    """MB/s of raw rows through ``codec`` with ``threads`` threads, and the stored ratio."""
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        sizes = list(pool.map(lambda _: len(codec(data)), range(CHUNKS)))
        seconds = time.perf_counter() - start
    return CHUNKS * data.nbytes / seconds / 1e6, sizes[0] / data.nbytes


def main() -> None:
    # No options; the parser gives --help, so that a look at the usage never runs the codecs.
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    shuffled, raw = shuffled_chunk(), raw_chunk()
    cores = len(os.sched_getaffinity(0))
    rows = []
    for name, codec in CODECS.items():
        for threads in sorted({1, 4, 8, min(16, cores)}):
            mbps, ratio = rate(codec, raw if name in RAW else shuffled, threads)
            rows.append(
                {
                    "codec": name,
                    "threads": threads,
                    "mb_per_s": round(mbps),
                    "ratio": round(ratio, 3),
                }
            )
    print("| codec | threads | MB/s of rows | stored / raw |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['codec']} | {r['threads']} | {r['mb_per_s']:,} | {r['ratio']} |")
    result = {
        "benchmark": "residue_compression",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": cores,
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "chunk": {
            "rows": 1024,
            "width": 2560,
            "dtype": "float16",
            "shuffled": sorted(set(CODECS) - RAW),
        },
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    host = "gpu" if Path("/dev/nvidia0").exists() else "cpu"
    path = RESULTS / f"residue_compression-{stamp}-{host}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path} ({cores} CPUs)")


if __name__ == "__main__":
    main()
