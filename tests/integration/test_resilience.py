"""Nothing lost: each guarantee proven by causing the fault for real on a real cluster.

Faults are real signals to real processes (workers, nannies, the driver). Where a fault needs a
hook inside a worker (a chunk that raises, a memory spike), a test ``WorkerPlugin`` patches the
worker process, the way an operator's plugin would; the engine itself is never mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

import virnuc_dask
from tests.faults import MemorySpike, PoisonSequence, SlowChunks
from tests.helpers import CLI, TINY, dask_processes, random_sequences, write_fasta
from virnuc_dask.errors import VirnucError
from virnuc_dask.output import write_shard

CHUNK_TOKENS = 6_000


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """About 100,000 tokens of the tiny model in 17 or so chunks."""
    folder = tmp_path_factory.mktemp("workload")
    fasta = folder / "in.fasta"
    ids = write_fasta(fasta, random_sequences(600, 50, 300, seed=31))
    return fasta, ids


@pytest.fixture(scope="module")
def baseline(cluster_client, workload, tmp_path_factory):
    """The uninterrupted run on two workers (lanes=2, the same chunks as every faulty run)."""
    fasta, _ = workload
    out = tmp_path_factory.mktemp("baseline") / "out.h5"
    job = virnuc_dask.prepare(
        [fasta], out, lanes=2, model=TINY, random_weights=True, chunk_tokens=CHUNK_TOKENS
    )
    job.run(cluster_client, progress=False)
    return virnuc_dask.open_embeddings(out).load()


def assert_same_output(path: Path, baseline) -> None:
    ds = virnuc_dask.open_embeddings(path).load()
    assert list(ds.sequence.values) == list(baseline.sequence.values)
    np.testing.assert_allclose(ds.embedding.values, baseline.embedding.values, rtol=1e-6, atol=1e-7)


def _wait_for_shards(work: Path, count: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = len(list((work / "shards").glob("shard-*.h5"))) if work.exists() else 0
        if done >= count:
            return done
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} shards in {work} after {timeout} s")


def _three_workers():
    cluster = LocalCluster(
        n_workers=3, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
    )
    return cluster, Client(cluster)


def _run_and_kill_a_worker(client, fasta, out, kill):
    """Run the job in a thread; once two shards exist, ``kill(client, worker_address)``."""
    client.register_plugin(SlowChunks(0.4))
    job = virnuc_dask.prepare(
        [fasta], out, lanes=2, model=TINY, random_weights=True, chunk_tokens=CHUNK_TOKENS
    )
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(path=job.run(client, progress=False)))
    runner.start()
    _wait_for_shards(job.work_dir, 2)
    kill(client, next(iter(client.scheduler_info()["workers"])))
    runner.join(timeout=180)
    assert not runner.is_alive()
    assert result["path"] == out
    assert job.report.chunks == len(job.partition.chunks)  # assembly refuses a double
    assert sum(job.report.worker_tokens.values()) == job.partition.lane_tokens().sum()
    return job


def test_worker_killed_mid_run_is_restarted_by_its_nanny(workload, baseline, tmp_path):
    fasta, _ = workload
    out = tmp_path / "out.h5"

    def kill(client, victim):
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)

    cluster, client = _three_workers()
    with cluster, client:
        _run_and_kill_a_worker(client, fasta, out, kill)
        client.wait_for_workers(3, timeout=60)  # the nanny brought it back
    assert_same_output(out, baseline)


@pytest.mark.slow  # the default run loses a worker in test_a_lost_worker_costs_only_its_chunk...
def test_worker_killed_mid_run_for_good(workload, baseline, tmp_path):
    fasta, _ = workload
    out = tmp_path / "out.h5"

    def kill(client, victim):
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)

    with dask_processes(tmp_path, 3, nanny=False) as (_, address, workers), Client(address) as c:
        c.wait_for_workers(3, timeout=60)
        _run_and_kill_a_worker(c, fasta, out, kill)
        assert sum(w.poll() is None for w in workers) == 2
    assert_same_output(out, baseline)


@pytest.mark.slow
def test_worker_over_its_memory_limit_is_restarted_without_losing_work(
    workload, baseline, tmp_path
):
    fasta, _ = workload
    out = tmp_path / "out.h5"
    marker = tmp_path / "spiked"
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        memory_limit="1.5GB",
    )
    with cluster, Client(cluster) as client:
        client.register_plugin(MemorySpike(2.0, str(marker)))
        job = virnuc_dask.prepare(
            [fasta], out, lanes=2, model=TINY, random_weights=True, chunk_tokens=CHUNK_TOKENS
        )
        job.run(client, progress=False)
    assert marker.exists()  # the spike happened, and the nanny ended that worker
    assert job.report.chunks == len(job.partition.chunks)
    assert_same_output(out, baseline)


def _start_cli(fasta: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *CLI,
            "embed",
            str(fasta),
            "-o",
            str(out),
            "--model",
            TINY,
            "--random-weights",
            "--workers",
            "2",
            "--chunk-tokens",
            str(CHUNK_TOKENS),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("SIGKILL", marks=pytest.mark.slow),
        "SIGTERM",
        pytest.param("Ctrl-C", marks=pytest.mark.slow),
    ],
)
def test_driver_interrupted_then_resumed(how, workload, baseline, tmp_path):
    fasta, _ = workload
    out = tmp_path / "out.h5"
    work = tmp_path / "out.h5.work"
    proc = _start_cli(fasta, out, "--quiet")
    try:
        _wait_for_shards(work, 3)
        if how == "SIGKILL":  # the driver and its local cluster die at once, as on preemption
            os.killpg(proc.pid, signal.SIGKILL)
        elif how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:  # a terminal sends SIGINT to the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert not out.exists()
    if how != "SIGKILL":
        assert proc.returncode == 130
        assert "rerun with --resume" in stderr
    finished = len(list((work / "shards").glob("shard-*.h5")))
    assert finished >= 3

    refused = subprocess.run(
        [
            *CLI,
            "embed",
            str(fasta),
            "-o",
            str(out),
            "--model",
            TINY,
            "--random-weights",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "pass --resume" in refused.stderr

    resumed = _start_cli(fasta, out, "--resume")
    try:
        _, stderr = resumed.communicate(timeout=300)
    finally:
        _kill_group(resumed)
    assert resumed.returncode == 0, stderr[-2000:]
    reused = int(stderr.split("resume: ")[1].split(" of ")[0])
    assert reused >= 3  # a shard the dying workers were finishing may be added or recomputed
    assert_same_output(out, baseline)
    assert not work.exists()


def test_foreign_and_half_written_shards_are_recomputed(
    workload, baseline, cluster_client, tmp_path, caplog
):
    import h5py

    fasta, _ = workload
    out = tmp_path / "out.h5"
    job = virnuc_dask.prepare(
        [fasta], out, lanes=2, model=TINY, random_weights=True, chunk_tokens=CHUNK_TOKENS
    )
    job.run(cluster_client, progress=False)
    # Rebuild the work directory as an interrupted run would leave it, then spoil two shards.
    job = virnuc_dask.prepare(
        [fasta],
        tmp_path / "again.h5",
        lanes=2,
        model=TINY,
        random_weights=True,
        chunk_tokens=CHUNK_TOKENS,
    )
    work = job.work_dir
    for chunk in job.partition.chunks[:4]:
        rows = job.partition.order[chunk.start : chunk.stop]
        values = baseline.embedding.values[rows][:, None, :]
        write_shard(
            work / "shards" / f"shard-{chunk.number:06d}.h5",
            rows=rows,
            ids=job.index.ids(rows),
            embedding=values,
            fingerprint=job.fingerprint,
        )
    with h5py.File(work / "shards" / "shard-000001.h5", "r+") as f:
        f.attrs["fingerprint"] = "another-model"
    (work / "shards" / "shard-000002.h5").write_bytes(b"\x89HDF half")
    (work / "shards" / ".shard-000005.h5.abc.partial").write_bytes(b"half")
    job.release()

    with caplog.at_level("INFO", logger="virnuc_dask"):
        resumed = virnuc_dask.prepare(
            [fasta],
            tmp_path / "again.h5",
            lanes=2,
            model=TINY,
            random_weights=True,
            chunk_tokens=CHUNK_TOKENS,
            resume=True,
        )
    assert sorted(s.chunk for s in resumed.reused) == [0, 3]
    assert "shard-000001.h5 does not match this run" in caplog.text
    assert "shard-000002.h5 does not match this run" in caplog.text
    assert "half-written shard" in caplog.text
    resumed.run(cluster_client, progress=False)
    assert_same_output(tmp_path / "again.h5", baseline)


def test_failing_chunk_is_retried_then_named(workload, tmp_path):
    fasta, ids = workload
    poison = b"W" * 777
    poisoned = tmp_path / "poisoned.fasta"
    poisoned.write_text(fasta.read_text() + ">poisoned_one\n" + poison.decode() + "\n")
    log = tmp_path / "attempts.log"
    out = tmp_path / "out.h5"
    cluster, client = _three_workers()
    with cluster, client:
        client.register_plugin(PoisonSequence(poison, str(log)))
        job = virnuc_dask.prepare(
            [poisoned],
            out,
            lanes=2,
            model=TINY,
            random_weights=True,
            chunk_tokens=CHUNK_TOKENS,
            retries=2,
        )
        with pytest.raises(VirnucError) as error:
            job.run(client, progress=False)
    message = str(error.value)
    assert "poisoned_one" in message and "this sequence breaks the model" in message
    assert message.startswith("chunk ")
    assert log.read_text().count("attempt") == 3  # the first try and two retries
    assert not out.exists()
    assert not out.with_name("out.h5.lock").exists()
    assert job.work_dir.exists() and list((job.work_dir / "shards").glob("shard-*.h5"))


def test_a_second_run_into_the_same_output_is_refused(workload, tmp_path):
    fasta, _ = workload
    out = tmp_path / "out.h5"
    first = virnuc_dask.prepare([fasta], out, lanes=1, model=TINY, random_weights=True)
    try:
        with pytest.raises(VirnucError, match="in use by another run"):
            virnuc_dask.prepare(
                [fasta],
                out,
                lanes=1,
                model=TINY,
                random_weights=True,
                work_dir=tmp_path / "elsewhere",
            )
        with pytest.raises(VirnucError, match=f"pid {os.getpid()}"):
            virnuc_dask.prepare([fasta], out, lanes=1, model=TINY, random_weights=True, resume=True)
    finally:
        first.release()


def test_a_stale_lock_is_taken_over(workload, tmp_path, caplog):
    import socket

    fasta, _ = workload
    out = tmp_path / "out.h5"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    lock = {"pid": int(dead), "host": socket.gethostname(), "started": 0}
    out.with_name("out.h5.lock").write_text(json.dumps(lock))
    with caplog.at_level("WARNING", logger="virnuc_dask"):
        job = virnuc_dask.prepare([fasta], out, lanes=1, model=TINY, random_weights=True)
    assert "stale lock" in caplog.text
    job.release()
    assert not out.with_name("out.h5.lock").exists()


def test_an_early_ctrl_c_says_one_true_line(tmp_path):
    """Ctrl-C while the local cluster starts and the input is still being read: nothing was
    finished, so nothing is kept and the message does not offer --resume; no traceback."""
    out = tmp_path / "out.h5"
    proc = subprocess.Popen(
        [*CLI, "embed", "-", "-o", str(out), "--model", TINY, "--random-weights"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        proc.stdin.write(">a\nMKTAYIAKQR\n")
        proc.stdin.flush()
        # Standard input starts the cluster at once, while the driver still reads the input;
        # wait until its workers are loading the model, then press Ctrl-C.
        deadline = time.time() + 60
        while time.time() < deadline and not list(tmp_path.glob("out.h5.work/dask-scratch/*")):
            time.sleep(0.05)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 130
    lines = stderr.strip().splitlines()
    assert lines[-1] == "virnuc-dask: interrupted; nothing was finished, so nothing is kept", lines
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
    assert "--resume" not in stderr
    assert not (tmp_path / "out.h5.work").exists() and not out.exists()
