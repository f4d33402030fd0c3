"""Clusters: the local one fits the machine and its GPUs; an existing one is reached or refused
in bounded time, with a message that names the address or file."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import dask_processes
from virnuc_dask.cluster import hardware
from virnuc_dask.cluster.existing import connect
from virnuc_dask.cluster.hardware import default_cpu_workers, gpu_count, local_plan, visible_devices
from virnuc_dask.cluster.local import QuickExit
from virnuc_dask.errors import VirnucError


def test_cpu_plan_shares_the_cores():
    if gpu_count():
        pytest.skip("a GPU machine plans one worker per GPU")
    plan = local_plan(2)
    assert (plan.workers, plan.gpus) == (2, 0)
    assert plan.torch_threads == max(1, (os.cpu_count() or 1) // 2)
    assert local_plan().workers == default_cpu_workers(os.cpu_count() or 1)


def test_default_cpu_workers():
    assert [default_cpu_workers(n) for n in (1, 2, 4, 16, 64)] == [1, 1, 2, 4, 4]


def test_local_cluster_and_dashboard_listen_on_loopback():
    with connect(workers=1, dashboard_port=0) as (client, info):
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert all(a.startswith("tcp://127.0.0.1:") for a in client.scheduler_info()["workers"])
        assert info.dashboard.startswith("http://127.0.0.1:")


def test_scheduler_and_scheduler_file_exclude_each_other():
    with pytest.raises(VirnucError, match="not both"), connect(scheduler="a", scheduler_file="b"):
        pass


def test_missing_scheduler_file_is_a_clear_error(tmp_path):
    with (
        pytest.raises(VirnucError, match="does not exist"),
        connect(scheduler_file=str(tmp_path / "nope.json")),
    ):
        pass


@pytest.mark.parametrize(
    ("env", "count", "expected"),
    [
        (None, 4, ["0", "1", "2", "3"]),
        ("2,3", 4, ["2", "3"]),
        (" 3, 1 ", 4, ["3", "1"]),
        ("GPU-8f1a2b3c-aaaa,GPU-5d6e7f80-bbbb", 2, ["GPU-8f1a2b3c-aaaa", "GPU-5d6e7f80-bbbb"]),
        ("MIG-0c1d2e3f-4a5b,MIG-9e8d7c6b-5a4f", 1, ["MIG-0c1d2e3f-4a5b", "MIG-9e8d7c6b-5a4f"]),
        ("MIG-GPU-8f1a2b3c/1/0", 1, ["MIG-GPU-8f1a2b3c/1/0"]),
        ("", 8, []),
        ("-1", 8, []),
        # CUDA stops at the first entry it cannot use.
        ("1,7,0", 4, ["1"]),
        ("0,0,1", 4, ["0"]),
        ("0,bogus,1", 4, ["0"]),
    ],
)
def test_visible_devices_follow_cuda_visible_devices(env, count, expected):
    assert visible_devices(env, count) == expected


def test_gpu_count_honours_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(hardware, "physical_gpus", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_count() == 2 and local_plan().gpus == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_count() == 0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_count() == 4


@pytest.fixture
def scheduler_process(tmp_path):
    """A real ``dask scheduler`` on 127.0.0.1, its address and scheduler file."""
    scheduler_file = tmp_path / "scheduler.json"
    dask = str(Path(sys.executable).with_name("dask"))
    proc = subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
         "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)  # the file is written whole, but let the scheduler settle
        yield proc, json.loads(scheduler_file.read_text())["address"], scheduler_file
    finally:
        proc.send_signal(signal.SIGCONT)  # a test may have stopped it
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _refused(timeout=3, **where):
    """Connect with a short timeout; return the error and the seconds it took."""
    started = time.monotonic()
    with pytest.raises(VirnucError) as error, connect(timeout=timeout, worker_timeout=3, **where):
        pass
    return str(error.value), time.monotonic() - started


def test_frozen_scheduler_is_an_error_within_the_timeout(scheduler_process):
    proc, address, scheduler_file = scheduler_process
    proc.send_signal(signal.SIGSTOP)
    message, seconds = _refused(scheduler=address)
    assert address in message and "accepts connections but did not answer within 3 s" in message
    assert seconds < 10
    message, seconds = _refused(scheduler_file=str(scheduler_file))
    assert str(scheduler_file) in message and address in message and seconds < 10


def test_silent_listener_is_an_error_within_the_timeout():
    # The kernel accepts connections into the backlog; nobody ever answers.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        message, seconds = _refused(scheduler=address)
    assert address in message and "did not answer within 3 s" in message and seconds < 10


def test_closed_port_is_an_error_within_the_timeout():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    message, seconds = _refused(scheduler=address)
    assert address in message and "connection refused" in message and seconds < 10


@pytest.mark.parametrize("address", ["not a url", "tcp://host:notaport", "tcp://host:99999"])
def test_malformed_scheduler_address_is_named(address):
    message, seconds = _refused(scheduler=address)
    assert f"scheduler address {address!r} is not a Dask address" in message
    assert "tcp://HOST:PORT" in message and seconds < 1


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("this is not json", "is not a Dask scheduler file"),
        ('{"type": "Scheduler", "id": "x"}', "holds no scheduler address"),
        ("[1, 2]", "holds no scheduler address"),
        (b"\xff\xfe\x00garbage", "is not a Dask scheduler file"),
    ],
)
def test_bad_scheduler_file_is_named(tmp_path, content, problem):
    path = tmp_path / "scheduler.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    message, seconds = _refused(scheduler_file=str(path))
    assert f"scheduler file {path} {problem}" in message and "--scheduler-file" in message
    assert seconds < 1


def test_scheduler_without_workers_says_so_and_gives_up(scheduler_process, caplog):
    _, address, _ = scheduler_process
    with caplog.at_level(logging.WARNING, logger="virnuc_dask.cluster"):
        started = time.monotonic()
        with (
            pytest.raises(VirnucError, match="has no workers after 3 s") as error,
            connect(scheduler=address, timeout=3, worker_timeout=3),
        ):
            pass
    assert address in str(error.value) and f"dask worker {address}" in str(error.value)
    assert time.monotonic() - started < 10
    assert f"waiting for workers at {address}: none connected" in caplog.text


def test_existing_scheduler_with_a_worker_connects(tmp_path):
    with (
        dask_processes(tmp_path, 1) as (scheduler_file, address, _),
        connect(scheduler_file=str(scheduler_file), timeout=10) as (client, info),
    ):
        assert client.scheduler.address == address and info.workers == 1


def _torch_task() -> float:
    """Load the tiny model in the worker and run it: the worker has torch in memory."""
    import torch

    from virnuc_dask.model.checkpoint import resolve_weights
    from virnuc_dask.model.loading import load_model

    model = load_model(resolve_weights("esm2_t2_tiny", random_weights=True, seed=0))
    with torch.inference_mode():
        out = model(torch.tensor([[0, 5, 6, 7, 2]]), repr_layers=[2])
    return float(out["representations"][2].sum())


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_local_cluster_closes_without_killing_workers():
    # The nanny (in this process) warns "Worker process still alive after 4.0 seconds,
    # killing" when a worker has not exited in time; Dask's loggers do not propagate.
    collect = _Collect()
    nanny = logging.getLogger("distributed.nanny")
    nanny.addHandler(collect)
    try:
        with connect(workers=2, dashboard_port=0) as (client, _):
            assert all(
                client.run(lambda dask_worker: QuickExit.name in dask_worker.plugins).values()
            )
            futures = [
                client.submit(_torch_task, pure=False, workers=[w]) for w in client.has_what()
            ]
            client.gather(futures)
    finally:
        nanny.removeHandler(collect)
    assert not [m for m in collect.messages if "still alive" in m], collect.messages


def test_local_workers_start_loading_the_model_as_they_start(tmp_path):
    from virnuc_dask.cluster.plugin import EngineSettings, ModelPlugin, setup_stats
    from virnuc_dask.model.checkpoint import resolve_weights

    settings = EngineSettings(
        resolve_weights("esm2_t2_tiny", random_weights=True, seed=1),
        "fp32",
        (2,),
        1022,
        None,
        False,
    )
    assert EngineSettings.from_json(settings.to_json()) == settings
    with connect(workers=1, dashboard_port=0, engine=settings) as (client, _):
        client.register_plugin(ModelPlugin(settings), name=ModelPlugin.name)
        [stats] = client.run(setup_stats).values()
        assert stats["early"] and not stats["reused"]
        assert set(stats["detail"]) == {"import", "device", "weights", "engine"}
        # A run with other settings on the same workers loads its own model, not early.
        other = dataclasses.replace(settings, layers=(1,))
        client.register_plugin(ModelPlugin(other), name=ModelPlugin.name)
        [stats] = client.run(setup_stats).values()
        assert not stats["early"] and not stats["reused"]


def test_usable_cpus_honour_a_cgroup_quota_and_slurm(tmp_path, monkeypatch):
    from virnuc_dask.cluster import hardware

    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs: two cores' worth of threads at most
    assert hardware._cgroup_quota(str(quota)) == 2
    quota.write_text("max 100000\n")
    assert hardware._cgroup_quota(str(quota)) is None
    monkeypatch.setattr(hardware, "_cgroup_quota", lambda: 1)
    assert hardware.usable_cpus() == 1
    assert local_plan().torch_threads == 1 or gpu_count()
    monkeypatch.setattr(hardware, "_cgroup_quota", lambda: None)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert hardware.usable_cpus() == 1


def test_usable_cpus_without_an_affinity_call(monkeypatch):
    from virnuc_dask.cluster import hardware

    monkeypatch.delattr(os, "sched_getaffinity")  # as on macOS
    assert hardware.usable_cpus() >= 1
