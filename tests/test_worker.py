"""The chunk task in this process: existing shards, abandoned runs, time limits, engine cache."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np
import pytest

import virnuc_dask
from tests.helpers import TINY, random_sequences, write_fasta
from virnuc_dask.cluster import plugin, task, watchdog
from virnuc_dask.cluster.task import RunAbandoned, embed_chunk
from virnuc_dask.cluster.watchdog import time_limit
from virnuc_dask.engine import compiling
from virnuc_dask.model import checkpoint, loading
from virnuc_dask.output.shards import shard_path
from virnuc_dask.storage.locks import RunLock


@pytest.fixture
def job(tmp_path):
    """A prepared job of 40 sequences in a few chunks (not run)."""
    fasta = tmp_path / "in.fasta"
    write_fasta(fasta, random_sequences(40, 30, 120, seed=9))
    prepared = virnuc_dask.prepare(
        [fasta], tmp_path / "o.h5", model=TINY, random_weights=True, chunk_tokens=1500
    )
    yield prepared
    prepared.release()


def _chunk_job(job):
    return job.chunk_job()


def test_a_task_of_an_abandoned_run_writes_nothing(job):
    chunk_job = _chunk_job(job)
    chunk = job.partition.chunks[0]
    job.release()
    # Another run takes the work directory over.
    RunLock(job.work_dir / "lock", "work directory", "another-run").acquire()
    with pytest.raises(RunAbandoned, match="no longer holds"):
        embed_chunk(chunk, chunk_job)
    assert not list((job.work_dir / "shards").iterdir())


def test_a_chunk_with_its_shard_on_disk_is_not_computed_again(job, monkeypatch):
    chunk_job = _chunk_job(job)
    chunk = job.partition.chunks[0]
    first = embed_chunk(chunk, chunk_job)
    assert first.worker == "local"
    written = shard_path(chunk_job.shard_dir, chunk)
    mtime = os.stat(written).st_mtime_ns

    def refuse(settings):
        raise AssertionError("the engine was asked again")

    monkeypatch.setattr(task, "worker_engine", refuse)
    again = embed_chunk(chunk, chunk_job)
    assert again.worker == "existing" and again.path == first.path
    assert os.stat(written).st_mtime_ns == mtime


def test_time_limits():
    assert time_limit(1000, 5, None) == 5
    assert time_limit(1000, 0, 10.0) is None
    assert time_limit(1000, None, 1000.0) == watchdog.MIN_CHUNK_SECONDS
    assert time_limit(10**6, None, 1000.0) == pytest.approx(watchdog.SLACK * 1000)


#: What the brief measured: ESM-2 150M on a 2-core CPU worker embeds 68 tokens/s, and chunks
#: go to 2 M tokens; ESM-2 3B runs at about 100,000 tokens/s on an H200.
CPU_150M, GPU_3B = (148_000_000, "cpu", 2, 68.0), (2_840_000_000, "cuda", 1, 100_000.0)


@pytest.mark.parametrize("params, device, threads, real", [CPU_150M, GPU_3B])
def test_a_fresh_worker_gives_the_largest_healthy_chunk_the_time_it_needs(
    params, device, threads, real
):
    # Before any measurement: a speed assumed of the device, well below the real one, so the
    # automatic limit of a healthy 2 M-token chunk is longer than the chunk takes.
    assumed = watchdog.assumed_rate(params, device, threads)
    assert assumed < real / 5
    limit = time_limit(2_000_000, None, assumed)
    assert limit > 2_000_000 / real * watchdog.SLACK


def test_the_first_batch_sets_a_limit_the_chunk_can_meet_and_a_hang_still_ends(monkeypatch):
    monkeypatch.setattr(watchdog, "MIN_CHUNK_SECONDS", 0.2)
    monkeypatch.setattr(watchdog, "SLACK", 2.0)
    expired = []
    # A speed assumed far above the real one (limit 0.5 s): the first batch, 100 of 1,000
    # tokens after 0.3 s, says the chunk needs 3 s, so the limit becomes 2 x 3 s = 6 s.
    dog = watchdog._Watchdog(7, tokens=1000, seconds=0.5, measured=False, on_expire=expired.append)
    with dog:
        time.sleep(0.3)
        dog.batch(100)
        assert dog.seconds == pytest.approx(6.0, rel=0.2)
        time.sleep(0.5)
        assert expired == []  # past the first limit, within the one the first batch shows
    # No batch ever comes (a hung device): the limit holds.
    dog = watchdog._Watchdog(8, tokens=1000, seconds=0.3, measured=False, on_expire=expired.append)
    with dog:
        time.sleep(1.0)
    assert expired == [8]


def test_a_measured_speed_is_remembered_per_engine(job, monkeypatch):
    state = plugin.WorkerEngines()  # a fresh worker
    monkeypatch.setattr(plugin, "_OUTSIDE_A_WORKER", state)
    settings = job.engine_settings
    other = dataclasses.replace(settings, layers=(1,))
    assert state.remembered_rate(settings) is None
    embed_chunk(job.partition.chunks[0], job.chunk_job())
    assert state.remembered_rate(settings) > 0
    assert state.remembered_rate(other) is None  # another model or layers: not measured


def test_the_engine_is_built_once_when_threads_ask_at_once(job, monkeypatch):
    builds = []
    original = loading.load_model

    def slow_load(source, **kwargs):
        builds.append(threading.get_ident())
        time.sleep(0.5)
        return original(source, **kwargs)

    monkeypatch.setattr(loading, "load_model", slow_load)
    monkeypatch.setattr(plugin, "_OUTSIDE_A_WORKER", plugin.WorkerEngines())
    settings = job.engine_settings
    engines = []
    threads = [
        threading.Thread(target=lambda: engines.append(plugin.worker_engine(settings)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert all(engine is engines[0] for engine in engines)


def test_shards_carry_layers_and_fingerprint(job):
    import h5py

    chunk_job = _chunk_job(job)
    info = embed_chunk(job.partition.chunks[0], chunk_job)
    with h5py.File(info.path) as f:
        assert f.attrs["fingerprint"] == job.fingerprint
        assert list(np.asarray(f.attrs["layers"])) == [2]


def test_which_runs_compile_a_built_engine():
    # A large run leaves `compile` unset and the engine decides: a CPU engine never compiles
    # (nor a GPU engine with the fused kernels); an explicit True compiles, False never.
    import torch

    from virnuc_dask.engine.packed import PackedEngine
    from virnuc_dask.engine.reference import ReferenceEngine

    # A private model: the engine fuses its q/k/v storage.
    tiny_model = loading.load_model(checkpoint.resolve_weights(TINY, random_weights=True, seed=0))
    engine = PackedEngine(tiny_model, layers=[2], dtype=torch.float32)
    assert not engine.fused and not engine.compiled and not engine.compiles_by_default
    assert compiling.compiles_now(None, engine) is False
    assert compiling.compiles_now(False, engine) is False
    assert compiling.compiles_now(True, engine) is True
    engine.compiled = True  # a compiled engine serves every run as it is
    assert compiling.compiles_now(True, engine) is False
    assert compiling.compiles_now(True, ReferenceEngine(tiny_model, layers=[2])) is False
    with pytest.raises(RuntimeError, match="CUDA and Triton"):
        PackedEngine(tiny_model, layers=[2], dtype=torch.float32, fused=True)
