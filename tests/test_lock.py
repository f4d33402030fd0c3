"""Run locks: exclusive, stale ones taken over by exactly one run, tokens for tasks."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest

from virnuc_dask.errors import VirnucError
from virnuc_dask.lock import RunLock, holds


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)  # fmt: skip


def _stale(path) -> None:
    path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "run": "old"}))


def test_a_held_lock_refuses_a_second_holder(tmp_path):
    first = RunLock(tmp_path / "lock", "output x", "a").acquire()
    with pytest.raises(VirnucError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "lock", "output x", "b").acquire()
    first.release()
    assert not (tmp_path / "lock").exists()


def test_the_token_says_which_run_holds_the_lock(tmp_path):
    lock = RunLock(tmp_path / "lock", "work directory", "run-a").acquire()
    assert holds(tmp_path / "lock", "run-a") and not holds(tmp_path / "lock", "run-b")
    lock.release()
    assert not holds(tmp_path / "lock", "run-a")


def _contend(path: str, barrier, results) -> None:
    barrier.wait()
    try:
        RunLock(path, "output x", str(os.getpid())).acquire()
        results.put(os.getpid())
    except VirnucError:
        results.put(None)
    # Stay alive until every contender has tried: a winner that exited would leave a stale
    # lock that a later contender may rightly take over.
    barrier.wait()


def test_a_stale_lock_is_taken_over_by_exactly_one_of_many(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for attempt in range(15):
        path = tmp_path / f"lock{attempt}"
        _stale(path)
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(str(path), barrier, results)) for _ in range(6)]
        for proc in procs:
            proc.start()
        winners = [w for w in (results.get(timeout=30) for _ in procs) if w is not None]
        for proc in procs:
            proc.join()
        assert len(winners) == 1, f"attempt {attempt}: {len(winners)} runs took the lock"
        assert json.loads(path.read_text())["pid"] == winners[0]


def test_release_leaves_a_lock_that_another_run_took(tmp_path):
    path = tmp_path / "lock"
    mine = RunLock(path, "output x", "mine").acquire()
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "run": "theirs"}))
    mine.release()
    assert path.exists()
