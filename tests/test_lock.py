"""Run locks: exclusive, stale ones taken over by exactly one run, tokens for tasks.

The leases on an object store are tested against moto's S3 server on 127.0.0.1: another run's
takeover is made to land between a run's read of its lease and its write (or delete), the
window where an unconditional write would undo the takeover.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import fsspec
import pytest

from tests.servers import s3_server
from virnuc_dask.errors import VirnucError
from virnuc_dask.storage import locks as run_lock
from virnuc_dask.storage.locks import RunLock, holds
from virnuc_dask.storage.remote import Remote


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


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server, its endpoint in the environment; yields an s3fs filesystem."""
    with s3_server():
        yield fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True)


class _Interleaved(Remote):
    """A lock's real URL that runs ``then`` right after its ``after``-th read.

    Stands for another run whose request reaches the store in the window between this run's
    read of the lock and its next request.
    """

    after: int = 0
    then = None

    def arm(self, after: int, then) -> None:
        """Run ``then()`` right after the ``after``-th read from now."""
        self.after, self.then = after, then

    def _read_done(self) -> None:
        self.after -= 1
        if self.after == 0 and self.then is not None:
            self.then()

    def read_text(self) -> str:
        text = super().read_text()
        self._read_done()
        return text

    def read_versioned(self):
        found = super().read_versioned()
        self._read_done()
        return found


def _expired_lease(url: str, token: str, monkeypatch) -> RunLock:
    """A run holding the lock at ``url`` whose lease looks stale (it expired as written)."""
    with monkeypatch.context() as patch:
        patch.setattr(run_lock, "LEASE_SECONDS", -1.0)
        held = RunLock(_Interleaved(url), "output x", token).acquire()
    assert json.loads(Remote(url).read_text())["expires"] < time.time()
    return held


def test_a_renewal_just_after_a_takeover_leaves_the_takers_lease(s3, monkeypatch, caplog):
    s3.mkdir("renewal")
    url = "s3://renewal/out.h5.lock"
    first = _expired_lease(url, "first", monkeypatch)
    taker = []
    first.path.arm(1, lambda: taker.append(RunLock(Remote(url), "output x", "taker").acquire()))
    with caplog.at_level("ERROR", logger="virnuc_dask"):
        assert not first.renew()
    assert taker and holds(url, "taker") and not holds(url, "first")
    assert f"the lock {url} is no longer this run's" in caplog.text
    first.release()
    assert holds(url, "taker")
    taker[0].release()
    assert not s3.exists("renewal/out.h5.lock")


def test_a_release_just_after_a_takeover_leaves_the_takers_lease(s3, monkeypatch):
    s3.mkdir("release")
    url = "s3://release/out.h5.lock"
    first = _expired_lease(url, "first", monkeypatch)
    taker = []
    first.path.arm(1, lambda: taker.append(RunLock(Remote(url), "output x", "taker").acquire()))
    first.release()
    assert taker and holds(url, "taker")
    taker[0].release()
    assert not s3.exists("release/out.h5.lock")


def test_a_takeover_loses_to_a_renewal_of_the_lease_it_judged_stale(s3, monkeypatch):
    s3.mkdir("takeover")
    url = "s3://takeover/out.h5.lock"
    first = _expired_lease(url, "first", monkeypatch)
    # The taker's second read is the one under its guard: the first run renews right after.
    taker = RunLock(_Interleaved(url), "output x", "taker")
    taker.path.arm(2, first.renew)
    with pytest.raises(VirnucError, match="in use by another run"):
        taker.acquire()
    assert holds(url, "first") and not taker.held
    assert not s3.exists("takeover/out.h5.lock.takeover")
    first.release()
    assert not s3.exists("takeover/out.h5.lock")


class _RetriedPut(Remote):
    """A lock's real URL whose conditional PUT is sent twice, as botocore retries a request
    whose answer was lost: the second finds the condition failed by the first."""

    def write_if(self, data: bytes, version: str | None) -> str | None:
        super().write_if(data, version)
        return super().write_if(data, version)


def test_a_renewal_retried_after_its_answer_was_lost_keeps_the_lease(s3):
    s3.mkdir("retried")
    url = "s3://retried/out.h5.lock"
    held = RunLock(_RetriedPut(url), "output x", "mine").acquire()
    assert held.renew() and held.held and holds(url, "mine")
    held.release()  # deletes the version the retried renewal wrote
    assert not s3.exists("retried/out.h5.lock")
