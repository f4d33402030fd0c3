"""On GPUs: the whole run through ``LocalCUDACluster`` equals the fp32 reference within bf16.

Marked ``gpu``: skipped without CUDA, run on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distributed import Client

import virnuc_dask
from tests.helpers import random_sequences, write_fasta
from virnuc_dask.engine.fidelity import row_agreement
from virnuc_dask.engine.reference import ReferenceEngine
from virnuc_dask.model.checkpoint import resolve_weights
from virnuc_dask.model.loading import load_model

pytestmark = pytest.mark.gpu
MODEL = "esm2_t6_8M_UR50D"


def _compare(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    cosine, error = row_agreement(actual, expected)
    return float(cosine.min()), float(error.max())


@pytest.mark.parametrize("workers", [1, 2])
def test_local_cuda_cluster_matches_fp32_reference(workers, tmp_path):
    if torch.cuda.device_count() < workers:
        pytest.skip(f"needs {workers} GPUs")
    from virnuc_dask.cluster.existing import connect

    seqs = random_sequences(1500, 1, 1100, seed=workers)
    fasta = tmp_path / "in.fasta"
    write_fasta(fasta, seqs)
    model = load_model(resolve_weights(MODEL, random_weights=True, seed=0)).cuda()
    expected = ReferenceEngine(model, layers=[6]).embed([s.encode() for s in seqs])[:, 0]
    del model
    torch.cuda.empty_cache()

    with connect(workers=workers) as (client, info):
        assert isinstance(client, Client) and info.gpus == workers
        outputs = []
        for budget in (None, 8192):  # the automatic budget, and ~100 consecutive batches
            path = virnuc_dask.embed(
                [fasta],
                tmp_path / f"out-{budget}.h5",
                client=client,
                model=MODEL,
                random_weights=True,
                tokens_per_batch=budget,
                progress=False,
            )
            ds = virnuc_dask.open_embeddings(path).load()
            assert ds.attrs["compute_dtype"] == "bf16"
            assert list(ds.sequence.values) == [f"seq{i}" for i in range(len(seqs))]
            outputs.append(ds.embedding.values)
    for actual in outputs:
        cosine, error = _compare(actual, expected)
        print(f"{workers} GPU(s): min cosine {cosine:.6f}, max relative error {error:.4f}")
        assert cosine >= 0.9999 and error <= 0.01
    cosine, error = _compare(outputs[0], outputs[1])
    assert cosine >= 0.9999 and error <= 0.01


def test_a_quiet_command_on_gpus_prints_only_its_summary(tmp_path):
    """The local CUDA cluster closes without a word: no ERROR line after the summary (bokeh
    3.10 made distributed's dashboard fail to stop, logging two at every close)."""
    import subprocess

    from tests.helpers import CLI

    write_fasta(tmp_path / "in.fasta", random_sequences(50, 20, 300, seed=3))
    result = subprocess.run(
        [*CLI, "embed", "in.fasta", "-o", "out.h5", "--model", MODEL, "--random-weights",
         "--workers", "1", "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("50 sequences, 50 distinct"), lines


def test_the_worker_command_of_a_gpu_slurm_job_serves_a_run(tmp_path):
    """What a ``--cluster slurm`` GPU job runs (the last line of dask-jobqueue's script for
    ``--slurm-gpus 1``: ``python -m dask_cuda.cli SCHEDULER ...``) joins a scheduler as a CUDA
    worker and gives the file of a local CUDA cluster of one worker. This machine has no
    Slurm: the command runs as the job would run it, without ``sbatch``."""
    import sys

    pytest.importorskip("dask_jobqueue")
    from tests.helpers import assert_rows_close, processes, scheduler_address
    from virnuc_dask.cluster.slurm import SlurmSettings, jobqueue

    fasta = tmp_path / "in.fasta"
    write_fasta(fasta, random_sequences(300, 1, 600, seed=4))
    settings = dict(model=MODEL, random_weights=True, progress=False)
    local = virnuc_dask.embed(fasta, tmp_path / "local.h5", workers=1, **settings)

    scheduler_file = tmp_path / "scheduler.json"
    scheduler = [
        *(sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1"),
        *("--port", "0", "--dashboard-address", "127.0.0.1:0"),
        *("--scheduler-file", str(scheduler_file)),
    ]
    with processes(scheduler):
        address = scheduler_address(scheduler_file)
        _, SLURMJob = jobqueue()
        arguments = SlurmSettings.from_settings({"gpus_per_job": 1}).cluster_arguments(None)
        script = SLURMJob(scheduler=address, name="gpu-job", **arguments).job_script()
        assert "#SBATCH --gres=gpu:1" in script
        command = script.strip().splitlines()[-1]
        assert " -m dask_cuda.cli " in command
        with processes(["bash", "-c", f"exec {command} --host 127.0.0.1"]):
            job = virnuc_dask.embed(
                fasta, tmp_path / "job.h5", scheduler_file=scheduler_file, **settings
            )
    expected = virnuc_dask.open_embeddings(local).load()
    actual = virnuc_dask.open_embeddings(job).load()
    assert actual.attrs["compute_dtype"] == "bf16"
    assert list(actual.sequence.values) == list(expected.sequence.values)
    assert_rows_close(actual.embedding.values, expected.embedding.values, rtol=1e-5)


def test_the_gpu_worker_rank_of_an_allocation_serves_a_run(tmp_path):
    """``--cluster slurm-allocation`` on a GPU node: rank 1 is a CUDA worker of rank 0's
    scheduler, and the file is a local CUDA run's. This machine has no Slurm: the two tasks
    of a step are started as ``srun`` starts them, with the variables it sets."""
    import os
    import subprocess

    pytest.importorskip("dask_cuda")
    from tests.helpers import CLI, assert_rows_close

    fasta = tmp_path / "in.fasta"
    write_fasta(fasta, random_sequences(300, 1, 600, seed=5))
    settings = dict(model=MODEL, random_weights=True, progress=False)
    local = virnuc_dask.embed(fasta, tmp_path / "local.h5", workers=1, **settings)

    command = [*CLI, "embed", str(fasta), "-o", str(tmp_path / "step.h5"), "--model", MODEL]
    command += ["--random-weights", "--cluster", "slurm-allocation", "--quiet"]
    step = {"SLURM_JOB_ID": "41", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    ranks = [
        subprocess.Popen(
            command,
            env={**os.environ, **step, "SLURM_PROCID": str(rank)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        said = [rank.communicate(timeout=300) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    assert [rank.returncode for rank in ranks] == [0, 0], said
    assert said[0][0].strip() == f"wrote {tmp_path / 'step.h5'}" and said[1][0] == ""
    expected = virnuc_dask.open_embeddings(local).load()
    actual = virnuc_dask.open_embeddings(tmp_path / "step.h5").load()
    assert actual.attrs["compute_dtype"] == "bf16"
    assert list(actual.sequence.values) == list(expected.sequence.values)
    assert_rows_close(actual.embedding.values, expected.embedding.values, rtol=1e-5)
    assert not list(tmp_path.glob("virnuc-dask-scheduler-*"))
