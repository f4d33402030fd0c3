"""The single-node Slurm of tests/slurm.py: jobs run, cancel, and nothing outlives it.

Real ``slurmctld``, ``slurmd`` and munge on this machine (skipped where they are not
installed); the Slurm commands are the real ones, pointed at the cluster by ``SLURM_CONF``.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.slurm import SlurmInfo, slurm_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> SlurmInfo:
    """One cluster for the module's job tests (a start takes about a second)."""
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as info:
        yield info


def job_state(slurm: SlurmInfo, job: str) -> str:
    """The job's state as ``squeue`` prints it (empty once it has left the queue)."""
    return slurm.run("squeue", "--noheader", "--jobs", job, "--format=%T").stdout.strip()


def sbatch(slurm: SlurmInfo, *args: str) -> str:
    """Submit a batch job; return its id."""
    return slurm.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]


def test_srun_prints_the_hostname(slurm):
    done = slurm.run("srun", "hostname")
    assert done.stdout.strip() == socket.gethostname()


def test_the_environment_points_at_the_cluster(slurm):
    assert os.environ["SLURM_CONF"] == str(slurm.conf)
    out = subprocess.run(
        ["sinfo", "--noheader", "--format=%P %c %m"], capture_output=True, text=True
    )
    assert out.stdout.split() == [f"{slurm.partition}*", str(slurm.cpus), str(slurm.memory_mb)]


def test_a_batch_job_writes_its_output(slurm, tmp_path):
    output = tmp_path / "job-%j.out"
    job = sbatch(slurm, f"--output={output}", "--wrap", "echo written by $SLURM_JOB_ID")
    wait_until(lambda: not job_state(slurm, job), 60, f"job {job} still queued")
    assert Path(str(output).replace("%j", job)).read_text() == f"written by {job}\n"


def test_two_tasks_both_run(slurm):
    done = slurm.run("srun", "-n", "2", "bash", "-c", "echo task $SLURM_PROCID")
    assert sorted(done.stdout.splitlines()) == ["task 0", "task 1"]


def test_a_cancelled_job_leaves_the_queue(slurm):
    job = sbatch(slurm, "--output=/dev/null", "--wrap", "sleep 300")
    wait_until(lambda: job_state(slurm, job) == "RUNNING", 60, f"job {job} not running")
    slurm.run("scancel", job)
    wait_until(lambda: not slurm.squeue_jobs(), 30, f"squeue still lists {slurm.squeue_jobs()}")


def test_nothing_is_left_after_the_cluster(tmp_path):
    saved = os.environ.get("SLURM_CONF")
    with slurm_cluster(tmp_path) as slurm:
        assert pgrep(tmp_path)  # the daemons' command lines name the folder
        # A job still running at the end: its script, in the folder's spool, must go too.
        job = sbatch(slurm, "--output=/dev/null", "--wrap", "sleep 300")
        wait_until(lambda: job_state(slurm, job) == "RUNNING", 60, f"job {job} not running")
        assert slurm.squeue_jobs() == [job]
    assert pgrep(tmp_path) == []
    assert os.environ.get("SLURM_CONF") == saved


def pgrep(folder: Path) -> list[str]:
    """The processes whose command line names ``folder`` (``pgrep -f``), one line each."""
    done = subprocess.run(["pgrep", "-af", str(folder)], capture_output=True, text=True)
    return done.stdout.splitlines()
