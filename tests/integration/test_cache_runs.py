"""Runs with an embedding cache: what is found is not embedded again, and gives the same bits.

Whole runs on real ``LocalCluster``s of worker processes with the tiny model, a cache in a
local folder and on moto's real S3 server, and two command-line runs at once sharing one
cache. Each sequence gets a batch of its own (``tokens_per_batch=1``), so that values can be
compared bit for bit with a run that computes them (the engines are not batch-invariant in
the last bits, see ``test_dedup.py``).
"""

from __future__ import annotations

import os
import re
import subprocess

import fsspec
import numpy as np
import pytest

import virnuc_dask
from tests.helpers import CLI, TINY, random_sequences, write_fasta
from tests.servers import s3_server
from virnuc_dask.cache.maintenance import verify
from virnuc_dask.cache.store import EmbeddingCache
from virnuc_dask.errors import VirnucError

SETTINGS = dict(model=TINY, random_weights=True, chunk_tokens=3_000, tokens_per_batch=1)


def _run(client, inputs, out, **settings):
    job = virnuc_dask.prepare(inputs, out, client=client, **{**SETTINGS, **settings})
    path = job.run(client, progress=False)
    return job, virnuc_dask.open_embeddings(path).load()


def _same(a, b) -> bool:
    return list(a.sequence.values) == list(b.sequence.values) and all(
        np.array_equal(a[name].values, b[name].values) for name in a.data_vars
    )


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two FASTA files sharing half their sequences (the second also repeats one)."""
    folder = tmp_path_factory.mktemp("datasets")
    shared = random_sequences(20, 20, 300, seed=21)
    first = shared + random_sequences(20, 20, 300, seed=22)
    second = random_sequences(20, 20, 300, seed=23) + shared[::-1] + [shared[0].lower()]
    one, two = folder / "one.fasta", folder / "two.fasta"
    write_fasta(one, first, [f"a{i}" for i in range(len(first))])
    write_fasta(two, second, [f"b{i}" for i in range(len(second))], width=13)
    return str(one), str(two)


def test_a_rerun_computes_nothing_and_a_half_overlap_only_its_new_half(
    cluster_client, datasets, tmp_path
):
    one, two = datasets
    cache = str(tmp_path / "cache")
    first_job, first = _run(cluster_client, [one], tmp_path / "1.h5", cache=cache)
    assert first_job.cached == 0 and len(first_job.partition.order) == 40
    again_job, again = _run(cluster_client, [one], tmp_path / "2.h5", cache=cache)
    assert again_job.cached == 40 and again_job.report.chunks == 0
    assert ", 40 from the cache, " in again_job.report.summary()
    assert " in 0 chunks " in again_job.report.summary()
    assert again.attrs["from_cache"] == 40
    assert _same(again, first)
    # Half of the second dataset is new: only that half is embedded.
    half_job, half = _run(cluster_client, [two], tmp_path / "3.h5", cache=cache)
    assert half_job.cached == 20 and len(half_job.partition.order) == 20
    _, fresh = _run(cluster_client, [two], tmp_path / "4.h5")
    assert _same(half, fresh)
    # The check sees a wrong row.
    fresh.embedding.values[[0, 1]] = fresh.embedding.values[[1, 0]]
    assert not _same(half, fresh)


def test_the_graph_on_a_users_client_uses_and_fills_the_cache(cluster_client, datasets, tmp_path):
    """The graph's last step (on a worker) reads the hits and adds the new rows, as run()."""
    one, two = datasets
    cache = str(tmp_path / "cache")
    _, first = _run(cluster_client, [one], tmp_path / "1.h5", cache=cache)
    job = virnuc_dask.prepare([two], tmp_path / "2.h5", client=cluster_client, cache=cache,
                              **SETTINGS)  # fmt: skip
    assert job.cached == 20
    try:
        assert cluster_client.compute(job.graph()).result() == str(tmp_path / "2.h5")
    finally:
        job.finish(success=True)
    _, fresh = _run(cluster_client, [two], tmp_path / "3.h5")
    assert _same(virnuc_dask.open_embeddings(tmp_path / "2.h5").load(), fresh)
    # The graph's new rows went into the cache: the same dataset again computes nothing.
    again, _ = _run(cluster_client, [two], tmp_path / "4.h5", cache=cache)
    assert again.cached == 40 and again.report.chunks == 0


@pytest.mark.parametrize(
    "change",
    [dict(layers=[1]), dict(max_residues=200), dict(output_dtype="float16"), dict(seed=1)],
    ids=["layers", "max_residues", "output_dtype", "weights"],
)
def test_another_setting_misses_the_cache_entirely(cluster_client, datasets, tmp_path, change):
    one, _ = datasets
    cache = str(tmp_path / "cache")
    _run(cluster_client, [one], tmp_path / "1.h5", cache=cache)
    job, _ = _run(cluster_client, [one], tmp_path / "2.h5", cache=cache, **change)
    assert job.cached == 0 and len(job.partition.order) == 40


def test_a_damaged_segment_is_found_by_verify_and_refused_by_a_run(
    cluster_client, datasets, tmp_path
):
    one, _ = datasets
    cache = tmp_path / "cache"
    _run(cluster_client, [one], tmp_path / "1.h5", cache=str(cache))
    segment = sorted(cache.glob("*/segments/*.h5"))[0]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x01
    segment.write_bytes(bytes(data))
    problems = verify(EmbeddingCache(str(cache)))
    assert [p for p in problems if p.damaged] and segment.stem in str(problems[0])
    with pytest.raises(VirnucError, match=segment.stem):
        _run(cluster_client, [one], tmp_path / "2.h5", cache=str(cache))
    assert not (tmp_path / "2.h5").exists()


def test_per_residue_runs_cannot_use_the_cache(datasets, tmp_path):
    one, _ = datasets
    with pytest.raises(VirnucError, match="pooled embeddings only"):
        virnuc_dask.prepare(
            [one], tmp_path / "o.h5", cache=str(tmp_path / "c"), per_residue=True, **SETTINGS
        )


def _command(fasta: str, out, cache: str) -> list[str]:
    return [
        *CLI, "embed", fasta, "-o", str(out), "--cache", cache, "--model", TINY,
        "--random-weights", "--chunk-tokens", "1500", "--tokens-per-batch", "1",
        "--workers", "1", "--quiet",
    ]  # fmt: skip


def _two_runs_at_once(datasets, tmp_path, cache: str, env=None) -> None:
    one, two = datasets
    runs = [
        subprocess.Popen(
            _command(fasta, tmp_path / f"{name}.h5", cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for name, fasta in (("one", one), ("two", two))
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
    # Nothing lost: every sequence of both is found now, with its own values.
    for name, fasta in (("one", one), ("two", two)):
        again = subprocess.run(
            _command(fasta, tmp_path / f"{name}-again.h5", cache),
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert " in 0 chunks " in again.stderr, again.stderr
        a = virnuc_dask.open_embeddings(tmp_path / f"{name}.h5").load()
        b = virnuc_dask.open_embeddings(tmp_path / f"{name}-again.h5").load()
        assert _same(a, b)


def test_two_runs_at_once_share_a_local_cache(datasets, tmp_path):
    _two_runs_at_once(datasets, tmp_path, str(tmp_path / "cache"))


def test_two_runs_at_once_share_a_cache_on_s3(datasets, tmp_path):
    with s3_server():
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("shared")
        _two_runs_at_once(datasets, tmp_path, "s3://shared/cache", env=dict(os.environ))


def test_a_run_that_took_from_a_cache_resumes_only_with_it(cluster_client, datasets, tmp_path):
    one, two = datasets
    cache = str(tmp_path / "cache")
    _run(cluster_client, [one], tmp_path / "1.h5", cache=cache)
    out = tmp_path / "2.h5"
    job = virnuc_dask.prepare([two], out, client=cluster_client, cache=cache, **SETTINGS)
    job.run(cluster_client, progress=False, cleanup=False)
    job.release()  # the work directory stays, as after an interrupt
    out.unlink()
    with pytest.raises(VirnucError, match="took 20 sequences from an embedding cache"):
        virnuc_dask.prepare([two], out, client=cluster_client, resume=True, **SETTINGS)
    resumed = virnuc_dask.prepare(
        [two], out, client=cluster_client, resume=True, cache=cache, **SETTINGS
    )
    assert resumed.cached == 20 and not resumed.todo
    resumed.run(cluster_client, progress=False)
    _, fresh = _run(cluster_client, [two], tmp_path / "3.h5")
    assert _same(virnuc_dask.open_embeddings(out).load(), fresh)


def test_a_run_killed_while_it_fills_the_cache_leaves_it_usable(datasets, tmp_path):
    """SIGKILL of a whole command (driver and workers) after its first segments: the cache
    has no damage, and a rerun finds what was added and embeds the rest."""
    import signal
    import time

    one, _ = datasets
    cache = tmp_path / "cache"
    run = subprocess.Popen(
        _command(one, tmp_path / "killed.h5", str(cache)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(cache.glob("*/entries/*.json")):
            time.sleep(0.05)
        assert list(cache.glob("*/entries/*.json")), "no segment was added in time"
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert not [p for p in verify(EmbeddingCache(str(cache))) if p.damaged]
    again = subprocess.run(
        [*_command(one, tmp_path / "again.h5", str(cache)), "--work-dir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    found = int(re.search(r", ([\d,]+) from the cache, ", again.stderr).group(1))
    assert 0 < found <= 40
    fresh = subprocess.run(
        [*CLI, "embed", one, "-o", str(tmp_path / "fresh.h5"), "--model", TINY,
         "--random-weights", "--tokens-per-batch", "1", "--workers", "1", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr
    a = virnuc_dask.open_embeddings(tmp_path / "again.h5").load()
    b = virnuc_dask.open_embeddings(tmp_path / "fresh.h5").load()
    assert _same(a, b)
