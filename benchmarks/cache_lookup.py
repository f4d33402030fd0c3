"""Lookup in the embedding cache: N digests against N cached ones, as a run's start does.

Fills a local cache with N random digests (BLAKE2b-128 stand-ins: uniform random bytes) in
segments of ``--segment`` rows (embeddings of 1 layer x 4 values: the lookup never opens a
segment, so their width does not matter), then looks up N digests of which ``--hit`` are
cached, in a fresh :class:`~virnuc_dask.cache.Namespace` each repeat (every entry read and
parsed again, as a new run does). Times three parts of each lookup: listing and reading the
entries, building the sorted index, and searching it; and checks that the hits are exactly the
cached digests. Prints a table and writes JSON to ``benchmarks/results/``.

    python benchmarks/cache_lookup.py                         # 1,000,000 against 1,000,000
    python benchmarks/cache_lookup.py --cached 10000000 --segment 100000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from common.machine import describe

from virnuc_dask.cache import EmbeddingCache
from virnuc_dask.cache.index import DigestIndex

RESULTS = Path(__file__).resolve().parent / "results"


def fill(folder: Path, cached: np.ndarray, segment: int) -> float:
    """Write ``cached`` into a new cache at ``folder``; return the seconds it took."""
    namespace = EmbeddingCache(folder).namespace({"benchmark": "cache_lookup"}, create=True)
    started = time.perf_counter()
    for start in range(0, len(cached), segment):
        rows = cached[start : start + segment]
        namespace.add(rows, np.zeros((len(rows), 1, 4), dtype=np.float32))
    return time.perf_counter() - started


def lookup_once(folder: Path, queries: np.ndarray) -> dict:
    """One lookup in a fresh namespace object, timed by parts and whole."""
    namespace = EmbeddingCache(folder).namespace({"benchmark": "cache_lookup"})
    started = time.perf_counter()
    entries = namespace.entries()
    read = time.perf_counter()
    index = DigestIndex([e.digests for e in entries])
    built = time.perf_counter()
    where = index.find(queries)
    searched = time.perf_counter()
    # The method itself, end to end, as a run calls it (a fresh object again).
    fresh = EmbeddingCache(folder).namespace({"benchmark": "cache_lookup"})
    whole_start = time.perf_counter()
    hits = fresh.lookup(queries)
    whole = time.perf_counter() - whole_start
    assert np.array_equal(hits.found, where >= 0)
    return {
        "entries": len(entries),
        "read_s": read - started,
        "index_s": built - read,
        "search_s": searched - built,
        "lookup_s": whole,
        "hits": int(hits.count),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cached", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1_000_000)
    parser.add_argument("--hit", type=float, default=0.5, help="share of queries cached")
    parser.add_argument("--segment", type=int, default=10_000, help="rows per segment")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", type=Path, default=None, help="where the cache goes")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    cached = rng.integers(0, 256, (args.cached, 16), dtype=np.uint8)
    hits = int(args.queries * args.hit)
    queries = np.concatenate(
        [
            cached[rng.choice(args.cached, hits, replace=False)],
            rng.integers(0, 256, (args.queries - hits, 16), dtype=np.uint8),
        ]
    )
    queries = queries[rng.permutation(len(queries))]
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        fill_s = fill(Path(tmp) / "cache", cached, args.segment)
        rows = [lookup_once(Path(tmp) / "cache", queries) for _ in range(args.repeats)]
    assert all(row["hits"] == hits for row in rows), "the hits are not the cached digests"

    median = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith("_s")}
    print(
        f"\n{args.queries:,} lookups against {args.cached:,} cached digests in "
        f"{rows[0]['entries']:,} segments of {args.segment:,} (filled in {fill_s:.1f} s); "
        f"{hits:,} hits; median of {args.repeats}"
    )
    print(f"{'part':<28} {'seconds':>8}")
    for name, label in [
        ("read_s", "list and parse entries"),
        ("index_s", "build the sorted index"),
        ("search_s", "search"),
        ("lookup_s", "Namespace.lookup, whole"),
    ]:
        print(f"{label:<28} {median[name]:>8.3f}")
    result = {
        "benchmark": "cache_lookup",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe(("numpy", "h5py")),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "fill_s": fill_s,
        "median": median,
        "rows": rows,
    }
    out = args.out or RESULTS / f"cache_lookup-{datetime.now(UTC):%Y%m%d}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
