"""Runs that share a cluster: per-run keys, cancelled futures, time limits, lost workers.

Every test runs real ``dask scheduler`` / ``dask worker`` processes or ``LocalCluster`` worker
processes; faults are injected into the real engine through a ``WorkerPlugin``
(:mod:`tests.faults`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster

import virnuc_dask
from tests.faults import CountCalls, Hang, PoisonSequence, SlowChunks
from tests.helpers import CLI, TINY, dask_processes, random_sequences, write_fasta
from virnuc_dask.errors import VirnucError

CHUNK_TOKENS = 4_000


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    """Two different FASTA files of about 50,000 tokens each."""
    folder = tmp_path_factory.mktemp("inputs")
    a, b = folder / "a.fasta", folder / "b.fasta"
    write_fasta(a, random_sequences(250, 50, 300, seed=41), [f"a{i}" for i in range(250)])
    write_fasta(b, random_sequences(300, 40, 250, seed=42), [f"b{i}" for i in range(300)])
    return a, b


@pytest.fixture(scope="module")
def singles(two_inputs, cluster_client, tmp_path_factory):
    """Each input's output from a run alone on the cluster."""
    folder = tmp_path_factory.mktemp("singles")
    out = {}
    for fasta in two_inputs:
        path = folder / f"{fasta.stem}.h5"
        job = virnuc_dask.prepare(
            [fasta], path, lanes=2, model=TINY, random_weights=True, chunk_tokens=CHUNK_TOKENS
        )
        job.run(cluster_client, progress=False)
        out[fasta.stem] = virnuc_dask.open_embeddings(path).load()
    return out


def assert_same(path: Path, expected) -> None:
    """Same ids in the same order, and the same vectors to 1e-6."""
    ds = virnuc_dask.open_embeddings(path).load()
    assert list(ds.sequence.values) == list(expected.sequence.values)
    np.testing.assert_allclose(ds.embedding.values, expected.embedding.values, rtol=1e-6, atol=1e-7)


def _cli(fasta: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, "embed", str(fasta), "-o", str(out), "--model", TINY, "--random-weights",
         "--chunk-tokens", str(CHUNK_TOKENS), "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # fmt: skip


@pytest.mark.slow  # the default run has two runs at once through one client
def test_two_commands_at_once_on_one_scheduler(two_inputs, singles, tmp_path):
    a, b = two_inputs
    with (
        dask_processes(tmp_path, 2) as (scheduler_file, _, _),
        Client(scheduler_file=str(scheduler_file)) as client,
    ):
        client.wait_for_workers(2, timeout=60)
        client.register_plugin(SlowChunks(0.1))  # the two runs overlap for sure
        procs = [
            _cli(fasta, tmp_path / f"{fasta.stem}.h5", "--scheduler-file", str(scheduler_file))
            for fasta in (a, b)
        ]
        for proc in procs:
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr[-2000:]
    assert_same(tmp_path / "a.h5", singles["a"])
    assert_same(tmp_path / "b.h5", singles["b"])
    assert not (tmp_path / "a.h5.work").exists() and not (tmp_path / "b.h5.work").exists()


def test_two_runs_at_once_through_one_client(two_inputs, singles, cluster_client, tmp_path):
    jobs = [
        virnuc_dask.prepare(
            [fasta],
            tmp_path / f"{fasta.stem}.h5",
            lanes=2,
            model=TINY,
            random_weights=True,
            chunk_tokens=CHUNK_TOKENS,
        )
        for fasta in two_inputs
    ]
    results: dict[str, object] = {}

    def run(job):
        try:
            results[job.output.stem] = job.run(cluster_client, progress=False)
        except BaseException as error:  # reported below
            results[job.output.stem] = error

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert results == {"a": tmp_path / "a.h5", "b": tmp_path / "b.h5"}
    assert jobs[0].report.sequences == 250 and jobs[1].report.sequences == 300
    assert_same(tmp_path / "a.h5", singles["a"])
    assert_same(tmp_path / "b.h5", singles["b"])


def test_a_failed_run_does_not_poison_the_next_on_the_same_client(two_inputs, singles, tmp_path):
    a, _ = two_inputs
    poison = b"W" * 333
    poisoned = tmp_path / "poisoned.fasta"
    poisoned.write_text(a.read_text() + ">poisoned_one\n" + poison.decode() + "\n")
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(PoisonSequence(poison, str(tmp_path / "attempts.log")))
        failing = virnuc_dask.prepare(
            [poisoned], tmp_path / "a.h5", lanes=2, model=TINY, random_weights=True,
            chunk_tokens=CHUNK_TOKENS, retries=0,
        )  # fmt: skip
        with pytest.raises(VirnucError, match="poisoned_one") as error:
            failing.run(client, progress=False)
        assert error.value.__traceback__ is not None
        assert error.value.__cause__ is None and error.value.__context__ is None
        # Nothing of the failed run is left on the scheduler (a release reaches the client's
        # event loop a moment later: Future.release() only schedules it).
        deadline = time.monotonic() + 5
        while client.who_has() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not client.who_has()
        started = time.perf_counter()
        # The input is fixed: its finished chunks are of other inputs, discarded on request.
        fixed = virnuc_dask.prepare(
            [a], tmp_path / "a.h5", lanes=2, model=TINY, random_weights=True,
            chunk_tokens=CHUNK_TOKENS, restart=True,
        )  # fmt: skip
        fixed.run(client, progress=False)
        assert time.perf_counter() - started > 0.5  # it computed
    assert fixed.report.sequences == 250
    assert_same(tmp_path / "a.h5", singles["a"])


@pytest.mark.slow  # the default run checks an abandoned run's task (tests/test_worker.py)
def test_interrupted_command_on_a_scheduler_leaves_no_task_writing(two_inputs, tmp_path):
    a, _ = two_inputs
    out = tmp_path / "a.h5"
    shards = tmp_path / "a.h5.work" / "shards"
    with (
        dask_processes(tmp_path, 2) as (scheduler_file, _, _),
        Client(scheduler_file=str(scheduler_file)) as client,
    ):
        client.wait_for_workers(2, timeout=60)
        client.register_plugin(SlowChunks(1.0))
        proc = _cli(a, out, "--scheduler-file", str(scheduler_file))
        try:
            deadline = time.time() + 120
            while len(list(shards.glob("shard-*.h5"))) < 2 and time.time() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 130, stderr[-2000:]
        assert not (tmp_path / "a.h5.lock").exists()
        kept = sorted(shards.glob("shard-*.h5"))
        time.sleep(3)  # longer than a chunk: a task still running would have written by now
        assert sorted(shards.glob("shard-*.h5")) == kept
        assert not any(client.processing().values())


def test_a_hung_chunk_is_ended_and_given_to_a_fresh_worker(two_inputs, singles, tmp_path):
    a, _ = two_inputs
    first = a.read_text().split(">")[1].split("\n", 1)[1].replace("\n", "").encode()
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(Hang(first, 3600, once=str(tmp_path / "hung")))
        job = virnuc_dask.prepare(
            [a], tmp_path / "a.h5", lanes=2, model=TINY, random_weights=True,
            chunk_tokens=CHUNK_TOKENS, chunk_time_limit=3,
        )  # fmt: skip
        started = time.perf_counter()
        job.run(client, progress=False)
        assert time.perf_counter() - started < 120
        assert (tmp_path / "hung").exists()
    assert_same(tmp_path / "a.h5", singles["a"])


def test_a_chunk_that_always_hangs_stops_the_run_naming_it(two_inputs, tmp_path):
    a, _ = two_inputs
    first = a.read_text().split(">")[1].split("\n", 1)[1].replace("\n", "").encode()
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 1}),
        LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(Hang(first, 3600))
        job = virnuc_dask.prepare(
            [a], tmp_path / "a.h5", lanes=2, model=TINY, random_weights=True,
            chunk_tokens=CHUNK_TOKENS, chunk_time_limit=2,
        )  # fmt: skip
        with pytest.raises(VirnucError) as error:
            job.run(client, progress=False)
    message = str(error.value)
    assert message.startswith("chunk ") and "a0" in message and "time limit (2 s" in message
    assert "resume=True" in message
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "a.h5.lock").exists()


def test_a_lost_worker_costs_only_its_chunk_in_flight(two_inputs, singles, tmp_path):
    a, _ = two_inputs
    log = tmp_path / "calls.log"
    with (
        LocalCluster(
            n_workers=3, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(CountCalls(str(log), seconds=0.3))
        job = virnuc_dask.prepare(
            [a], tmp_path / "a.h5", lanes=2, model=TINY, random_weights=True,
            chunk_tokens=CHUNK_TOKENS,
        )  # fmt: skip
        chunks = len(job.partition.chunks)
        result: dict = {}
        runner = threading.Thread(
            target=lambda: result.update(path=job.run(client, progress=False))
        )
        runner.start()
        shards = job.work_dir / "shards"
        # Once several chunks are finished, kill a worker that is computing one.
        deadline = time.time() + 120
        victim = None
        while time.time() < deadline and victim is None:
            busy = [w for w, keys in client.processing().items() if keys]
            if len(list(shards.glob("shard-*.h5"))) >= 3 and busy:
                victim = busy[0]
            time.sleep(0.05)
        assert victim is not None
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        runner.join(timeout=180)
        assert result["path"] == tmp_path / "a.h5"
    computed = len(log.read_text().split())
    # Every chunk once, plus at most the chunks that were in flight on the killed worker.
    assert computed <= chunks + 1, f"{computed} chunk computations for {chunks} chunks"
    assert_same(tmp_path / "a.h5", singles["a"])


def test_an_external_cluster_without_workers_stops_the_run_with_a_message(two_inputs, tmp_path):
    a, _ = two_inputs
    with (
        dask_processes(tmp_path, 1, nanny=False) as (scheduler_file, _, workers),
        Client(scheduler_file=str(scheduler_file)) as client,
    ):
        client.wait_for_workers(1, timeout=60)
        client.register_plugin(SlowChunks(0.5))
        job = virnuc_dask.prepare(
            [a], tmp_path / "a.h5", client=client, model=TINY, random_weights=True,
            chunk_tokens=CHUNK_TOKENS, wait_limit=3,
        )  # fmt: skip
        killer = threading.Timer(2.0, workers[0].kill)
        killer.start()
        started = time.perf_counter()
        with pytest.raises(VirnucError, match="no workers are connected to the scheduler"):
            job.run(client, progress=False)
        assert time.perf_counter() - started < 60
    assert not (tmp_path / "a.h5.lock").exists()
