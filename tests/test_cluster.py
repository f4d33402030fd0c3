"""The local cluster fits the machine and listens on 127.0.0.1 only."""

from __future__ import annotations

import os

import pytest

from virnuc_dask.cluster import connect, default_cpu_workers, gpu_count, local_plan
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
