"""``--cluster slurm``: worker jobs through dask-jobqueue, against a real single-node Slurm.

The Slurm is real (``tests/slurm.py``: munge, slurmctld and slurmd on this machine; skipped
where they are not installed), and so are ``sbatch``, ``squeue``, ``scancel`` and
dask-jobqueue. Workers are CPU jobs (``--slurm-gpus 0``) of ESM-2 8M with seeded random
weights. The scheduler and the workers listen on 127.0.0.1, set where users set it: in
dask-jobqueue's own configuration file (``jobqueue.yaml`` in ``DASK_CONFIG``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import virnuc_dask
from tests.helpers import (
    CLI,
    EXAMPLE,
    assert_rows_close,
    random_sequences,
    wait_until,
    write_fasta,
)
from tests.slurm import JOBQUEUE_YAML, SlurmInfo, slurm_cluster

MODEL = "esm2_t6_8M_UR50D"
#: Two CPU worker jobs of one core (the node has two).
JOBS = ["--cluster", "slurm", "--slurm-gpus", "0", "--slurm-jobs", "2", "--slurm-memory", "2GB"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> SlurmInfo:
    """One Slurm for the module (a start takes about a second), with dask-jobqueue's file."""
    folder = tmp_path_factory.mktemp("slurm")
    config = folder / "dask"
    config.mkdir()
    (config / "jobqueue.yaml").write_text(JOBQUEUE_YAML)
    with slurm_cluster(folder / "cluster") as info:
        info.env["DASK_CONFIG"] = str(config)
        yield info


def command(slurm: SlurmInfo, *args) -> list[str]:
    """The embed command of this module's runs: the 8M model, random weights."""
    return [*CLI, "embed", *map(str, args), "--model", MODEL, "--random-weights"]


def run(slurm: SlurmInfo, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the embed command to its end."""
    return subprocess.run(
        command(slurm, *args), env=slurm.env, capture_output=True, text=True, timeout=timeout
    )


def local_reference(slurm: SlurmInfo, inputs: Path, out: Path, *extra) -> object:
    """The same run on a local cluster of two workers: the same lanes, the same chunks."""
    done = run(slurm, inputs, "-o", out, "--workers", "2", "--quiet", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return virnuc_dask.open_embeddings(out).load()


def assert_same(actual: Path, expected) -> None:
    """Ids, order, lengths and every value of ``actual`` are those of ``expected`` (1e-6)."""
    ds = virnuc_dask.open_embeddings(actual).load()
    assert list(ds.sequence.values) == list(expected.sequence.values)
    np.testing.assert_array_equal(ds.length.values, expected.length.values)
    assert_rows_close(ds.embedding.values, expected.embedding.values, rtol=1e-6)


def running_jobs(slurm: SlurmInfo) -> list[str]:
    """Ids of the jobs Slurm runs now."""
    out = slurm.run("squeue", "--noheader", "--states=RUNNING", "--format=%i").stdout
    return out.split()


def many_sequences(folder: Path, count: int = 400) -> Path:
    """``count`` proteins of 100 to 300 residues: 400 make 17 chunks of 5,000 tokens."""
    path = folder / "many.fasta"
    write_fasta(path, random_sequences(count, 100, 300, seed=23))
    return path


# -- the default run -----------------------------------------------------------------------


def test_two_worker_jobs_give_the_local_file_and_leave_no_job(slurm, tmp_path):
    expected = local_reference(slurm, EXAMPLE, tmp_path / "local.h5")
    out = tmp_path / "slurm.h5"
    done = run(slurm, EXAMPLE, "-o", out, *JOBS, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"wrote {out}"
    assert "on 2 workers" in done.stderr
    assert_same(out, expected)
    assert slurm.squeue_jobs() == []
    assert not (tmp_path / "slurm.h5.work").exists()


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--slurm-partition", "nowhere"], "Invalid partition name specified"),
        (["--slurm-memory", "100TB"], "Requested node configuration is not available"),
    ],
    ids=["no-such-partition", "more-memory-than-the-node"],
)
def test_jobs_that_cannot_start_stop_the_run_in_one_line(slurm, tmp_path, flags, said):
    out = tmp_path / "out.h5"
    done = run(slurm, EXAMPLE, "-o", out, *JOBS, *flags)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("virnuc-dask: error: Slurm refuses the worker jobs: ")
    assert said in lines[0] and flags[0] in lines[0]
    assert slurm.squeue_jobs() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- slow: interruptions, failures, lost jobs, a queue that keeps jobs waiting --------------


@pytest.mark.slow
def test_ctrl_c_cancels_every_worker_job(slurm, tmp_path):
    out = tmp_path / "out.h5"
    proc = subprocess.Popen(
        # 1,600 proteins: a minute of work, so that the interrupt comes in its middle.
        command(slurm, many_sequences(tmp_path, 1600), "-o", out, *JOBS, "--chunk-tokens", "5000"),
        env=slurm.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until(lambda: len(running_jobs(slurm)) == 2, 60, "two worker jobs running")
        wait_until(
            lambda: list((tmp_path / "out.h5.work" / "shards").glob("shard-*.h5")),
            90,
            "a first shard",
        )
        assert proc.poll() is None and not out.exists(), "the run ended before the interrupt"
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr.splitlines()[-1]
    assert slurm.squeue_jobs() == []


@pytest.mark.slow
def test_a_failed_run_cancels_every_worker_job(slurm, tmp_path):
    # Every chunk runs past its limit: its worker is ended, and the scheduler (in the driver)
    # gives up on the first such chunk.
    env = {**slurm.env, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    done = subprocess.run(
        command(slurm, EXAMPLE, "-o", tmp_path / "out.h5", *JOBS, "--chunk-time-limit", "0.001"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "time limit" in done.stderr, done.stderr[-3000:]
    assert slurm.squeue_jobs() == []
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.slow
def test_a_cancelled_worker_job_costs_only_its_chunk(slurm, tmp_path):
    inputs = many_sequences(tmp_path)
    expected = local_reference(slurm, inputs, tmp_path / "local.h5", "--chunk-tokens", "5000")
    out = tmp_path / "slurm.h5"
    shards = tmp_path / "slurm.h5.work" / "shards"
    written: dict[str, set[int]] = {}  # each shard's name: the inodes it was seen with
    stop = threading.Event()

    jobs: set[str] = set()  # every worker job seen in the queue

    def watch_shards() -> None:
        while not stop.is_set():
            jobs.update(running_jobs(slurm))
            for shard in shards.glob("shard-*.h5") if shards.is_dir() else []:
                # A shard may go with the work directory at the end.
                with contextlib.suppress(FileNotFoundError):
                    written.setdefault(shard.name, set()).add(shard.stat().st_ino)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_shards)
    watcher.start()
    proc = subprocess.Popen(
        command(slurm, inputs, "-o", out, *JOBS, "--chunk-tokens", "5000", "--quiet"),
        env=slurm.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: len(running_jobs(slurm)) == 2, 60, "two worker jobs running")
        wait_until(lambda: len(written) >= 2, 120, "two shards")
        before = dict(written)
        cancelled = running_jobs(slurm)[0]
        slurm.run("scancel", cancelled)
        _, stderr = proc.communicate(timeout=300)
    finally:
        stop.set()
        watcher.join()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert_same(out, expected)
    # No shard was written twice: the finished chunks stayed, only the one in flight ran again.
    assert all(len(inodes) == 1 for inodes in written.values()), written
    assert set(before) <= set(written)
    # The cancelled job was replaced (lost 15 s, Dask's lost-worker-timeout, with chunks left).
    assert len(jobs) == 3, jobs
    assert slurm.squeue_jobs() == []


@pytest.mark.slow
def test_pending_workers_are_said_on_the_progress_line(slurm, tmp_path):
    # A job of the node's two CPUs keeps the worker jobs waiting in the queue.
    blocker = slurm.run(
        *("sbatch", "--parsable", f"--cpus-per-task={slurm.cpus}", "--wrap", "sleep 300"),
        f"--output={tmp_path / 'blocker.out'}",
    ).stdout.strip()
    wait_until(lambda: running_jobs(slurm) == [blocker], 30, "the blocking job running")
    proc = subprocess.Popen(
        command(slurm, EXAMPLE, "-o", tmp_path / "out.h5", *JOBS),
        env=slurm.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))
    reader.start()
    try:
        wait_until(
            lambda: any("2 workers pending in Slurm's queue" in line for line in lines),
            60,
            "a progress line naming the pending workers",
        )
        assert proc.poll() is None  # waiting, not stopped by the wait limit
        slurm.run("scancel", blocker)
        proc.wait(timeout=300)
    finally:
        slurm.run("scancel", blocker)
        if proc.poll() is None:
            proc.kill()
        reader.join()
    assert proc.returncode == 0, "".join(lines)[-3000:]
    pending = next(line for line in lines if "pending" in line)
    assert pending.startswith("0/5,145 tokens (0%), 0/2 chunks"), pending
    assert "Resources" in pending or "Priority" in pending
    assert not any("pending" in line for line in lines[-2:])  # the last lines: none pending
    assert slurm.squeue_jobs() == []


@pytest.mark.slow
def test_a_run_of_one_chunk_submits_one_job(slurm, tmp_path):
    # One sequence: one chunk, although two jobs are allowed.
    inputs = tmp_path / "one.fasta"
    write_fasta(inputs, random_sequences(1, 50, 60, seed=5))
    seen: set[str] = set()
    stop = threading.Event()

    def watch_queue() -> None:
        while not stop.is_set():
            seen.update(slurm.squeue_jobs())
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_queue)
    watcher.start()
    try:
        done = run(slurm, inputs, "-o", tmp_path / "out.h5", *JOBS, "--quiet")
    finally:
        stop.set()
        watcher.join()
    assert done.returncode == 0, done.stderr[-3000:]
    assert " in 1 chunk" in done.stderr, done.stderr
    assert len(seen) == 1, seen  # --slurm-jobs 2, but one chunk: one worker job
    assert slurm.squeue_jobs() == []
