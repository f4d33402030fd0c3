"""The Slurm worker jobs' settings, and the job scripts dask-jobqueue writes from them.

The scripts are dask-jobqueue's own (``SLURMJob.job_script``), not a copy of its format: what
is checked is what these settings make it write.
"""

from __future__ import annotations

import dask
import pytest

import virnuc_dask
from virnuc_dask.cluster.slurm import SlurmSettings, jobqueue
from virnuc_dask.errors import VirnucError

pytest.importorskip("dask_jobqueue")


def script(settings: SlurmSettings, log_directory=None) -> str:
    """The job script dask-jobqueue submits for ``settings``."""
    _, SLURMJob = jobqueue()
    arguments = settings.cluster_arguments(log_directory)
    return SLURMJob(scheduler="tcp://10.0.0.1:8786", name="w", **arguments).job_script()


def test_a_gpu_job_asks_its_gpus_and_runs_one_cuda_worker_thread_each():
    text = script(SlurmSettings.from_settings({"gpus_per_job": 2}))
    assert "#SBATCH --gres=gpu:2" in text
    assert "#SBATCH --cpus-per-task=16" in text  # 8 cores a GPU
    assert "#SBATCH --mem=60G" in text  # 32 GB a GPU, in Slurm's GiB
    assert "#SBATCH -J virnuc-dask" in text
    command = text.splitlines()[-1]
    assert " -m dask_cuda.cli tcp://10.0.0.1:8786 " in command
    assert "--nthreads 1 " in command  # one chunk at a time on each GPU
    assert "--nworkers" not in command  # dask cuda worker starts one per GPU itself


def test_a_cpu_job_runs_one_worker_with_all_its_cores_for_torch():
    settings = SlurmSettings.from_settings({"gpus_per_job": 0, "cores": 6, "memory": "12GB"})
    text = script(settings)
    assert "--gres" not in text
    assert "#SBATCH --cpus-per-task=6" in text
    assert "#SBATCH --mem=12G" in text
    command = text.splitlines()[-1]
    assert " -m distributed.cli.dask_worker " in command and "--nthreads 1 " in command
    assert settings.torch_threads == 6 and settings.max_workers == 4


def test_the_call_wins_over_virnuc_dask_slurm_which_wins_over_jobqueue_slurm():
    with dask.config.set(
        {
            "jobqueue.slurm.queue": "from-jobqueue",
            "jobqueue.slurm.walltime": "02:00:00",
            "jobqueue.slurm.account": "lab",
            "jobqueue.slurm.job-extra-directives": ["--qos=low"],
            "virnuc-dask.slurm.partition": "from-virnuc",
            "virnuc-dask.slurm.jobs": 7,
        }
    ):
        configured = SlurmSettings.from_settings()
        given = SlurmSettings.from_settings({"partition": "given", "job_extra": ["--exclusive"]})
        assert configured.jobs == given.jobs == 7
        assert "#SBATCH -p from-virnuc" in script(configured)
        text = script(given)
    assert "#SBATCH -p given" in text
    assert "#SBATCH -t 02:00:00" in text and "#SBATCH -A lab" in text
    assert text.index("--qos=low") < text.index("--gres=gpu:1") < text.index("--exclusive")


def test_jobqueue_cores_and_memory_are_used_where_virnuc_dask_says_nothing():
    with dask.config.set({"jobqueue.slurm.cores": 3, "jobqueue.slurm.memory": "5GB"}):
        text = script(SlurmSettings.from_settings({"gpus_per_job": 0}))
    assert "#SBATCH --cpus-per-task=3" in text and "#SBATCH --mem=5G" in text


def test_worker_logs_go_where_asked_unless_jobqueue_names_a_folder(tmp_path):
    settings = SlurmSettings.from_settings({"gpus_per_job": 0})
    assert f"#SBATCH -o {tmp_path}/virnuc-dask-%J.out" in script(settings, tmp_path)
    with dask.config.set({"jobqueue.slurm.log-directory": str(tmp_path / "mine")}):
        assert f"#SBATCH -o {tmp_path}/mine/virnuc-dask-%J.out" in script(settings, tmp_path)


@pytest.mark.parametrize(
    "given, said",
    [
        ({"jobs": 0}, "--slurm-jobs 0"),
        ({"gpus_per_job": -1}, "--slurm-gpus -1"),
        ({"cores": 0}, "--slurm-cores 0"),
    ],
)
def test_settings_out_of_range_are_refused(given, said):
    from virnuc_dask.errors import command_line_spelling

    with command_line_spelling(), pytest.raises(VirnucError, match=said):
        SlurmSettings.from_settings(given)


def test_an_unknown_setting_is_refused():
    with pytest.raises(TypeError, match="unknown Slurm settings: queue"):
        SlurmSettings.from_settings({"queue": "x"})


def test_a_scheduler_and_slurm_jobs_exclude_each_other(tmp_path):
    with pytest.raises(VirnucError, match="starts its own scheduler"):
        virnuc_dask.embed("x.fa", tmp_path / "o.h5", cluster="slurm", scheduler="tcp://h:8786")
    with pytest.raises(VirnucError, match="apply to"):
        virnuc_dask.embed("x.fa", tmp_path / "o.h5", slurm={"jobs": 2})
    with pytest.raises(VirnucError, match="cluster must be one of"):
        virnuc_dask.embed("x.fa", tmp_path / "o.h5", cluster="pbs")
    assert list(tmp_path.iterdir()) == []
