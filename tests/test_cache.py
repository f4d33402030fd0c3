"""The embedding cache: values back bit for bit, writers at once, killed writers, damage,
the user's folders, pruning, and the ``virnuc-dask cache`` commands.

Real files and moto's real S3 server (tests/servers.py); writers are real processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.servers import s3_server
from virnuc_dask.cache import CacheError, EmbeddingCache, info, prune, verify
from virnuc_dask.cli import main

SETTINGS = {"model": "esm2_t6_8M_UR50D", "layers": [6], "dtype": "float32"}
ROOT = Path(__file__).resolve().parent.parent


def _digests(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 16), dtype=np.uint8)


def _values(seed: int, count: int, layers: int = 2, width: int = 8) -> np.ndarray:
    """Random bit patterns as float32 (NaN payloads, infinities, -0.0 and subnormals too)."""
    bits = np.random.default_rng(seed + 10**6).integers(0, 2**32, (count, layers, width))
    return bits.astype(np.uint32).view(np.float32)


def _gather(hits, count: int, like: np.ndarray) -> np.ndarray:
    """The looked-up values in the looked-up order (zeros where missed)."""
    out = np.zeros((count, *like.shape[1:]), dtype=like.dtype)
    seen = np.zeros(count, dtype=bool)
    for positions, embedding in hits.blocks():
        assert not seen[positions].any()
        seen[positions] = True
        out[positions] = embedding
    assert np.array_equal(seen, hits.found)
    return out


def _bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint8)


def test_values_come_back_bit_equal_in_their_positions(tmp_path):
    namespace = EmbeddingCache(tmp_path / "cache").namespace(SETTINGS, create=True)
    digests, values = _digests(1, 300), _values(1, 300)
    # Two cached digests share their first 8 bytes: told apart by the last 8.
    digests[1, :8] = digests[0, :8]
    digests[2, :8] = digests[0, :8]
    for start in (0, 100, 200):
        namespace.add(digests[start : start + 80], values[start : start + 80])
    cached = np.zeros(300, dtype=bool)
    for start in (0, 100, 200):
        cached[start : start + 80] = True
    # A lookup in another order, with misses (one shares its first 8 bytes with a hit).
    order = np.random.default_rng(2).permutation(300)
    queries = digests[order].copy()
    stranger = digests[0].copy()
    stranger[15] ^= 1
    queries = np.concatenate([queries, stranger[None]])

    hits = EmbeddingCache(tmp_path / "cache").namespace(SETTINGS).lookup(queries)

    assert np.array_equal(hits.found, np.append(cached[order], False))
    assert hits.count == 240
    found = _gather(hits, len(queries), values)
    assert np.array_equal(_bits(found[:300][cached[order]]), _bits(values[order][cached[order]]))


def _write(location: str, seed: int, segments: int, rows: int, start) -> None:
    """A writer process: ``segments`` additions of ``rows`` digests of its own seed."""
    namespace = EmbeddingCache(location).namespace(SETTINGS, create=True)
    start.wait()
    for k in range(segments):
        namespace.add(_digests(seed * 1000 + k, rows), _values(seed * 1000 + k, rows))


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server, its endpoint in the environment, with a bucket ``cache``."""
    import fsspec

    with s3_server():
        fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True).mkdir("cache")
        yield


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_writer_processes_at_once_both_find_their_own_values(kind, tmp_path, request):
    if kind == "s3":
        request.getfixturevalue("s3")
        location = f"s3://cache/{tmp_path.name}"
    else:
        location = str(tmp_path / "cache")
    segments, rows = 12, 50
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    writers = [
        context.Process(target=_write, args=(location, seed, segments, rows, start))
        for seed in (1, 2)
    ]
    for writer in writers:
        writer.start()
    start.set()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0

    namespace = EmbeddingCache(location).namespace(SETTINGS)
    assert len(namespace.entries()) == 2 * segments
    for seed in (1, 2):
        digests = np.concatenate([_digests(seed * 1000 + k, rows) for k in range(segments)])
        values = np.concatenate([_values(seed * 1000 + k, rows) for k in range(segments)])
        hits = namespace.lookup(digests)
        assert hits.found.all()
        assert np.array_equal(_bits(_gather(hits, len(digests), values)), _bits(values))
    found = info(EmbeddingCache(location))
    assert [n.name for n in found.namespaces] == [namespace.name]
    assert found.sequences == 2 * segments * rows and found.orphans == 0
    assert verify(EmbeddingCache(location)) == []


def test_orphans_and_damage_at_a_url_are_found_and_pruned(s3, tmp_path):
    cache = EmbeddingCache(f"s3://cache/{tmp_path.name}")
    namespace = cache.namespace(SETTINGS, create=True)
    kept = namespace.add(_digests(1, 20), _values(1, 20))
    damaged = namespace.add(_digests(2, 20), _values(2, 20))
    orphan = namespace.segment_place("c" * 32)
    orphan.write_bytes(b"half a writer's work")
    segment = namespace.segment_place(damaged.id)
    data = bytearray(segment.read_bytes())
    data[-100] ^= 0x40
    segment.write_bytes(bytes(data))

    found = info(cache)
    assert (found.sequences, found.orphans, found.orphan_bytes) == (40, 1, 20)
    assert sorted((p.kind, p.where) for p in verify(cache)) == [
        ("damaged", str(segment)),
        ("orphan", str(orphan)),
    ]
    assert prune(cache, damaged=True).removed[0].reason == "damaged" and orphan.exists()
    report = prune(cache, now=time.time() + 7200)
    assert [r.reason for r in report.removed] == ["orphan"] and not orphan.exists()
    assert verify(cache) == [] and not segment.exists()
    assert [e.id for e in namespace.entries()] == [kept.id]


_KILLED_WRITER = """
import sys
import numpy as np
from virnuc_dask.cache import EmbeddingCache
namespace = EmbeddingCache(sys.argv[1]).namespace({settings}, create=True)
k = 0
while True:
    rng = np.random.default_rng(k)
    digests = rng.integers(0, 256, (2000, 16), dtype=np.uint8)
    namespace.add(digests, rng.standard_normal((2000, 2, 64)).astype(np.float32))
    k += 1
"""


def test_a_writer_killed_midway_leaves_a_readable_cache(tmp_path):
    location = tmp_path / "cache"
    script = _KILLED_WRITER.format(settings=repr(SETTINGS))
    delays = random.Random(0)
    for _ in range(3):
        writer = subprocess.Popen([sys.executable, "-c", script, str(location)], cwd=ROOT)
        try:
            entries = location / EmbeddingCache(location).namespace(SETTINGS).name / "entries"
            deadline = time.monotonic() + 60
            while not (entries.is_dir() and any(entries.glob("*.json"))):
                assert writer.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(delays.uniform(0.05, 0.5))
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait()

    namespace = EmbeddingCache(location).namespace(SETTINGS)
    written = len(namespace.entries())
    assert written >= 3
    # Every segment the writers could have written, a few more than they did.
    for k in range(written + 5):
        rng = np.random.default_rng(k)
        digests = rng.integers(0, 256, (2000, 16), dtype=np.uint8)
        values = rng.standard_normal((2000, 2, 64)).astype(np.float32)
        hits = namespace.lookup(digests)
        assert hits.count in (0, 2000)
        if hits.count:
            assert np.array_equal(_bits(_gather(hits, 2000, values)), _bits(values))
    problems = verify(EmbeddingCache(location))
    assert all(p.kind == "orphan" for p in problems), problems


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x40  # inside the embedding (the last dataset written)
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_found_refused_and_pruned(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    namespace = cache.namespace(SETTINGS, create=True)
    good, bad = _digests(1, 40), _digests(2, 40)
    namespace.add(good, _values(1, 40))
    damaged = namespace.add(bad, _values(2, 40))
    segment = Path(namespace.segment_place(damaged.id))
    _flip_a_byte(segment)

    problems = verify(cache)
    assert [(p.kind, p.where) for p in problems] == [("damaged", str(segment))]
    assert "SHA-256" in problems[0].what

    hits = EmbeddingCache(cache.location).namespace(SETTINGS).lookup(np.concatenate([good, bad]))
    assert hits.count == 80
    with pytest.raises(CacheError) as error:
        list(hits.blocks())
    message = str(error.value)
    assert str(segment) in message and "was not used" in message
    assert f"virnuc-dask cache verify {cache.location}" in message
    assert f"virnuc-dask cache prune --damaged {cache.location}" in message
    assert error.value.segment == str(segment)

    report = prune(cache, damaged=True)
    assert [r.reason for r in report.removed] == ["damaged"]
    assert not segment.exists() and verify(cache) == []
    hits = EmbeddingCache(cache.location).namespace(SETTINGS).lookup(np.concatenate([good, bad]))
    assert hits.found.tolist() == [True] * 40 + [False] * 40
    assert np.array_equal(_bits(_gather(hits, 80, _values(1, 40))[:40]), _bits(_values(1, 40)))


def test_a_foreign_or_vanished_segment_is_never_used(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    mine = cache.namespace(SETTINGS, create=True)
    theirs = cache.namespace({**SETTINGS, "dtype": "float16"}, create=True)
    entry = theirs.add(_digests(1, 10), _values(1, 10))
    # Their segment, under an entry of ours that vouches for its bytes: still not ours.
    Path(mine.segment_place(entry.id)).write_bytes(
        Path(theirs.segment_place(entry.id)).read_bytes()
    )
    record = json.loads(Path(theirs.entry_place(entry.id)).read_text())
    Path(mine.entry_place(entry.id)).write_text(json.dumps({**record, "namespace": mine.name}))
    with pytest.raises(CacheError, match="belongs to namespace"):
        list(mine.lookup(_digests(1, 10)).blocks())
    assert [p.kind for p in verify(cache)] == ["damaged"]

    gone = theirs.add(_digests(2, 10), _values(2, 10))
    hits = theirs.lookup(_digests(2, 10))
    Path(theirs.segment_place(gone.id)).unlink()
    with pytest.raises(CacheError, match="is gone"):
        list(hits.blocks())


def test_entries_that_cannot_be_used_are_skipped_with_a_warning(tmp_path, caplog):
    cache = EmbeddingCache(tmp_path / "cache")
    namespace = cache.namespace(SETTINGS, create=True)
    entry = namespace.add(_digests(1, 10), _values(1, 10))
    other = namespace.add(_digests(2, 10), _values(2, 10))
    Path(namespace.entry_place(entry.id)).write_text("{not json")
    record = json.loads(Path(namespace.entry_place(other.id)).read_text())
    Path(namespace.entry_place(other.id)).write_text(json.dumps({**record, "format": 2}))

    fresh = EmbeddingCache(cache.location).namespace(SETTINGS)
    assert fresh.lookup(np.concatenate([_digests(1, 10), _digests(2, 10)])).count == 0
    assert entry.id in caplog.text and other.id in caplog.text
    assert sorted(p.kind for p in verify(cache)) == ["damaged", "foreign"]
    prune(cache, damaged=True)
    # The damaged entry and its segment went; the other format's stays as it was.
    assert not Path(namespace.entry_place(entry.id)).exists()
    assert not Path(namespace.segment_place(entry.id)).exists()
    assert Path(namespace.entry_place(other.id)).exists()


def test_a_folder_of_the_users_is_refused(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty and holds no virnuc-dask-cache.json"):
        EmbeddingCache(folder).namespace(SETTINGS, create=True)
    for operation in (info, verify, prune):
        with pytest.raises(CacheError, match="is not an embedding cache"):
            operation(EmbeddingCache(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    # Without create, nothing is written and nothing is found.
    assert not EmbeddingCache(folder).namespace(SETTINGS).lookup(_digests(1, 3)).found.any()
    # An empty folder, or none, becomes a cache.
    (tmp_path / "empty").mkdir()
    EmbeddingCache(tmp_path / "empty").namespace(SETTINGS, create=True)
    assert (tmp_path / "empty" / "virnuc-dask-cache.json").is_file()
    assert EmbeddingCache(tmp_path / "new").namespaces() == []


def test_prune_by_age_by_size_and_old_orphans(tmp_path):
    day = 86400.0
    clock = [1_000_000.0]
    cache = EmbeddingCache(tmp_path / "cache", clock=lambda: clock[0])
    namespace = cache.namespace(SETTINGS, create=True)
    entries = []
    for k in range(4):
        clock[0] = 1_000_000.0 + k * day
        entries.append(namespace.add(_digests(k, 20), _values(k, 20)))
    now = 1_000_000.0 + 4 * day
    # Orphans: one an hour old and more, one just written (a writer between its writes).
    segments = Path(namespace.segment_place(entries[0].id)).parent
    old, young = segments / ("a" * 32 + ".h5"), segments / (".%s.h5.partial" % ("b" * 32))
    old.write_bytes(b"x" * 10)
    young.write_bytes(b"y" * 10)
    os.utime(old, (now - 7200, now - 7200))
    os.utime(young, (now - 60, now - 60))
    assert info(cache).orphans == 2

    report = prune(cache, older_than=2.5 * day, dry_run=True, now=now)
    assert len(report.removed) == 3 and all(
        Path(namespace.entry_place(e.id)).exists() for e in entries
    )

    report = prune(cache, older_than=2.5 * day, now=now)
    assert sorted(r.reason for r in report.removed) == ["older", "older", "orphan"]
    assert not old.exists() and young.exists()
    left = EmbeddingCache(cache.location).namespace(SETTINGS).entries()
    assert [e.id for e in left] == [entries[2].id, entries[3].id]

    report = prune(cache, max_bytes=entries[3].bytes, now=now)
    assert [r.reason for r in report.removed] == ["size"]
    assert not Path(namespace.segment_place(entries[2].id)).exists()
    assert [e.id for e in EmbeddingCache(cache.location).namespace(SETTINGS).entries()] == [
        entries[3].id
    ]


def test_the_cache_commands(tmp_path):
    location = str(tmp_path / "cache")
    namespace = EmbeddingCache(location).namespace(SETTINGS, create=True)
    namespace.add(_digests(1, 30), _values(1, 30))
    damaged = namespace.add(_digests(2, 12), _values(2, 12))
    runner = CliRunner()

    result = runner.invoke(main, ["cache", "info", location])
    assert result.exit_code == 0, result.output
    assert "42 sequences in 2 entries" in result.output
    assert "model esm2_t6_8M_UR50D, layers [6], dtype float32" in result.output

    result = runner.invoke(main, ["cache", "verify", location])
    assert result.exit_code == 0 and "no damage" in result.output
    _flip_a_byte(Path(namespace.segment_place(damaged.id)))
    result = runner.invoke(main, ["cache", "verify", location])
    assert result.exit_code == 1 and damaged.id in result.output

    result = runner.invoke(main, ["cache", "prune", location, "--damaged", "--dry-run"])
    assert result.exit_code == 0 and "would remove 1 entry" in result.output
    result = runner.invoke(main, ["cache", "prune", location, "--damaged"])
    assert result.exit_code == 0 and "removed 1 entry" in result.output
    result = runner.invoke(main, ["cache", "prune", location, "--older-than", "30d"])
    assert result.exit_code == 0 and "removed 0 entries" in result.output
    result = runner.invoke(main, ["cache", "prune", location, "--max-size", "1kB"])
    assert result.exit_code == 0 and "removed 1 entry" in result.output
    assert "0 sequences in 0 entries" in runner.invoke(main, ["cache", "info", location]).output

    result = runner.invoke(main, ["cache", "prune", location, "--max-size", "lots"])
    assert result.exit_code == 2 and "a size is a number and a unit" in result.output
    result = runner.invoke(main, ["cache", "info", str(tmp_path)])
    assert result.exit_code == 2
    assert "virnuc-dask: error:" in result.output and "is not an embedding cache" in result.output
