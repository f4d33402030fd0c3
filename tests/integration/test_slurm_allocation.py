"""``srun virnuc-dask embed ... --cluster slurm-allocation`` in a real Slurm allocation.

The single-node Slurm of ``tests/slurm.py`` runs ``sbatch -n 3 --wrap "srun virnuc-dask
embed ..."``: rank 0 is the scheduler and the driver, ranks 1 and 2 are CPU workers. The node
has two CPUs, so the jobs ask for ``--overcommit`` (rank 0 mostly waits). Outside an
allocation the command must refuse in one line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import virnuc_dask
from tests.helpers import CLI, assert_rows_close, random_sequences, write_fasta
from tests.slurm import SlurmInfo, processes_with, slurm_cluster

MODEL = "esm2_t6_8M_UR50D"
#: The command line's programs of this environment (the jobs inherit its environment).
PROGRAMS = Path(sys.executable).parent
#: Seconds a whole allocation run may take on two shared cores before the test fails.
JOB_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def sequences() -> list[str]:
    """Enough sequences for several chunks on each of two workers."""
    return random_sequences(150, 10, 120, seed=7)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, sequences) -> tuple[list[str], np.ndarray]:
    """The ids and embeddings of a local run of the same input (one CPU worker)."""
    folder = tmp_path_factory.mktemp("local")
    fasta = folder / "in.fasta"
    write_fasta(fasta, sequences)
    path = virnuc_dask.embed(
        fasta, folder / "local.h5", model=MODEL, random_weights=True, workers=1, progress=False
    )
    with virnuc_dask.open_embeddings(path) as ds:
        return list(ds.sequence.values), ds.embedding.values.copy()


def assert_same_embeddings(ids, rows, expected_ids, expected_rows) -> None:
    """Same ids in the same order, and every row within 1e-6 of the reference's."""
    assert list(ids) == list(expected_ids), "ids or their order differ"
    assert_rows_close(np.asarray(rows), np.asarray(expected_rows), rtol=1e-6)


def test_the_comparison_sees_a_perturbed_row_and_shuffled_ids(local_reference):
    ids, rows = local_reference
    assert_same_embeddings(ids, rows, ids, rows)
    perturbed = rows.copy()
    perturbed[17] *= 1 + 1e-5
    with pytest.raises(AssertionError, match="row 17"):
        assert_same_embeddings(ids, perturbed, ids, rows)
    order = np.random.default_rng(0).permutation(len(ids))
    with pytest.raises(AssertionError, match="ids"):
        assert_same_embeddings([ids[i] for i in order], rows[order], ids, rows)


def embed_tiny(fasta: Path, out: Path, env: dict) -> subprocess.CompletedProcess:
    """The allocation command on ``fasta``, run to its end in ``env``."""
    return subprocess.run(
        [*CLI, "embed", str(fasta), "-o", str(out), "--random-weights"]
        + ["--model", MODEL, "--cluster", "slurm-allocation"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_outside_an_allocation_the_command_refuses_in_one_line(tmp_path):
    fasta = tmp_path / "in.fasta"
    write_fasta(fasta, ["MKTAYIAK"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = embed_tiny(fasta, tmp_path / "out.h5", env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("virnuc-dask: error:"), done.stderr
    assert "srun" in lines[0]
    assert not (tmp_path / "out.h5").exists()


def test_one_task_is_refused(tmp_path):
    fasta = tmp_path / "in.fasta"
    write_fasta(fasta, ["MKTAYIAK"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="7", SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="1")
    done = embed_tiny(fasta, tmp_path / "out.h5", env)
    assert done.returncode == 2, done.stderr
    assert "1 task" in done.stderr and "--ntasks" in done.stderr, done.stderr


def test_a_scheduler_file_that_is_something_else_is_refused(tmp_path):
    fasta = tmp_path / "in.fasta"
    write_fasta(fasta, ["MKTAYIAK"])
    notes = tmp_path / "notes.txt"
    notes.write_text("not a scheduler file\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="7", SLURM_STEP_ID="0", SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="3")
    done = subprocess.run(
        [*CLI, "embed", str(fasta), "-o", str(tmp_path / "out.h5"), "--random-weights"]
        + ["--model", MODEL, "--cluster", "slurm-allocation", "--scheduler-file", str(notes)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"scheduler file {notes} exists and is not a Dask scheduler file" in done.stderr
    assert notes.read_text() == "not a scheduler file\n"


# -- whole allocations -------------------------------------------------------------------------


@pytest.fixture
def slurm(tmp_path) -> SlurmInfo:
    """A single-node Slurm for one test, stopped (every job cancelled) at its end."""
    with slurm_cluster(tmp_path / "slurm") as info:
        yield info


def submit(slurm: SlurmInfo, folder: Path, command: str, tasks: int = 3) -> str:
    """``sbatch -n TASKS --wrap "srun COMMAND"`` in ``folder``; return the job's id."""
    done = slurm.run(
        *("sbatch", "--parsable", "-n", str(tasks), "--overcommit", f"--chdir={folder}"),
        *(f"--output={folder}/job.out", "--wrap", f"srun {command}"),
    )
    return done.stdout.strip().split(";")[0]


def wait_for_end(slurm: SlurmInfo, job: str, timeout: float) -> str:
    """Wait until ``job`` leaves the queue; return the last state ``squeue`` gave it."""
    deadline = time.monotonic() + timeout
    state = "PENDING"
    while True:
        out = slurm.run("squeue", "--noheader", "--states=all", "--jobs", job, "--format=%T")
        if not out.stdout.strip():
            return state
        state = out.stdout.strip()
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return state
        assert time.monotonic() < deadline, f"job {job} still {state} after {timeout} s"
        time.sleep(0.2)


def embed_command(fasta: Path, output: Path) -> str:
    return (
        f"{PROGRAMS / 'virnuc-dask'} embed {fasta} -o {output} --model {MODEL} "
        "--random-weights --cluster slurm-allocation"
    )


def test_an_allocation_writes_what_a_local_run_writes(slurm, tmp_path, sequences, local_reference):
    folder = tmp_path / "run"
    folder.mkdir()
    fasta = folder / "in.fasta"
    write_fasta(fasta, sequences)
    output = folder / "out.h5"
    job = submit(slurm, folder, embed_command(fasta, output))
    state = wait_for_end(slurm, job, JOB_TIMEOUT)
    log = (folder / "job.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert slurm.squeue_jobs() == []
    with virnuc_dask.open_embeddings(output) as ds:
        assert_same_embeddings(ds.sequence.values, ds.embedding.values, *local_reference)
    # Rank 0 alone says where it wrote; the worker ranks print nothing (no Dask INFO lines).
    assert log.count(f"wrote {output}") == 1 and "INFO" not in log, log[-3000:]
    assert " on 2 workers: " in log, log[-3000:]  # the partition dealt to both worker ranks
    # The dashboard's link names the node's address, where other nodes reach the scheduler.
    links = re.findall(r"https?://([^:/\s]+):\d+/status", log)
    assert links and all(not host.startswith("127.") for host in links), log[-3000:]
    assert list(folder.glob("virnuc-dask-scheduler-*")) == []
    assert not (folder / "out.h5.work").exists()


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["malformed", "missing"])
def test_a_failing_rank_0_ends_the_whole_step(slurm, tmp_path, problem):
    folder = tmp_path / "run"
    folder.mkdir()
    fasta = folder / "in.fasta"
    if problem == "malformed":
        fasta.write_text(">one\nMKTAYIAK\n>two\nMKT1YIAK\n")  # a digit inside a sequence
    output = folder / "out.h5"
    started = time.monotonic()
    job = submit(slurm, folder, embed_command(fasta, output))
    state = wait_for_end(slurm, job, 120)
    seconds = time.monotonic() - started
    log = (folder / "job.out").read_text()
    assert state == "FAILED", log[-3000:]
    assert seconds < 90, f"the step took {seconds:.0f} s to end"
    assert slurm.squeue_jobs() == []
    errors = [line for line in log.splitlines() if line.startswith("virnuc-dask: error:")]
    assert len(errors) == 1 and str(fasta) in errors[0], log[-3000:]
    assert processes_with(f"SLURM_JOB_ID={job}") == []
    assert list(folder.glob("virnuc-dask-scheduler-*")) == []
    assert not output.exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "terminated"])
def test_the_worker_ranks_end_with_rank_0(slurm, tmp_path, how):
    folder = tmp_path / "run"
    folder.mkdir()
    fasta = folder / "in.fasta"
    write_fasta(fasta, random_sequences(2000, 50, 300, seed=8))  # minutes of work
    job = submit(slurm, folder, embed_command(fasta, folder / "out.h5"))
    deadline = time.monotonic() + JOB_TIMEOUT
    while not list(folder.glob("out.h5.work/shards/*")):  # running: a shard is written
        running = job in slurm.squeue_jobs() and time.monotonic() < deadline
        assert running, (folder / "job.out").read_text()[-3000:]
        time.sleep(0.2)
    # The task of rank 0 (srun itself, in the batch script, has no SLURM_STEP_ID).
    step = set(processes_with(f"SLURM_JOB_ID={job}")) & set(processes_with("SLURM_STEP_ID=0"))
    rank_0 = [pid for pid in processes_with("SLURM_PROCID=0") if pid in step]
    assert rank_0, "rank 0 not found"
    os.kill(min(rank_0), how)  # the rank's first process: the command itself
    killed = time.monotonic()
    state = wait_for_end(slurm, job, 120)
    seconds = time.monotonic() - killed
    print(f"the step ended {seconds:.1f} s after rank 0 got {how.name}")
    assert seconds < 60, f"the worker ranks outlived rank 0 by {seconds:.0f} s"
    assert state in ("FAILED", "COMPLETED"), state  # srun's exit: the killed task's
    assert slurm.squeue_jobs() == []
    assert processes_with(f"SLURM_JOB_ID={job}") == []
    if how == signal.SIGTERM:  # an orderly end: the finished chunks are kept for --resume
        log = (folder / "job.out").read_text()
        assert "kept in" in log and "--resume" in log, log[-3000:]
        assert list(folder.glob("virnuc-dask-scheduler-*")) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["another", "same"])
def test_a_scheduler_file_left_by_an_earlier_step_is_not_followed(slurm, tmp_path, sequences, name):
    folder = tmp_path / "run"
    folder.mkdir()
    fasta = folder / "in.fasta"
    write_fasta(fasta, sequences[:20])
    stale = folder / "scheduler.json"
    # A file an earlier step left, its scheduler gone (nothing listens on that port): of
    # another job, and of this very step's name (a job number used again).
    # (The test's own Slurm is new: its first job is job 1.)
    step = "999999.0" if name == "another" else "1.0"
    stale.write_text(
        json.dumps({"type": "Scheduler", "address": "tcp://127.0.0.1:9", "slurm-step": step})
    )
    command = f"{embed_command(fasta, folder / 'out.h5')} --scheduler-file {stale}"
    job = submit(slurm, folder, command)
    state = wait_for_end(slurm, job, JOB_TIMEOUT)
    log = (folder / "job.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert " on 2 workers: " in log or " on 1 worker: " in log, log[-3000:]
    assert not stale.exists()
