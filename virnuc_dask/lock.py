"""Run locks: one run at a time per output file and per work directory.

A lock is a small JSON file (owner pid, host, start time, the run's token) created with
``O_EXCL``, so two runs cannot both believe they hold it. A lock left by a process that no
longer exists on this host is stale: it is taken over with a warning. A lock held by a live
process, or by a process on another host (whose liveness cannot be checked from here), refuses
the second run with a message naming the owner.

Taking over a stale lock is atomic: the taker first creates a guard file with ``O_EXCL``
(``LOCK.takeover``), checks again under the guard that the lock is still the stale one it saw,
and replaces it with ``os.replace``. Two runs that find the same stale lock at the same moment
cannot both win: the loser finds the guard, or finds a live lock.

The token lets tasks of a run check that their run still holds the work directory before they
write into it (:func:`holds`): a task that outlives its interrupted run writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from virnuc_dask.errors import VirnucError

logger = logging.getLogger(__name__)

#: A takeover guard older than this belongs to a taker that died: it may be removed.
_GUARD_SECONDS = 30


class RunLock:
    """An exclusive lock file held for the duration of a run.

    Parameters
    ----------
    path
        The lock file to create.
    what
        What the lock protects, for messages (e.g. ``output out.h5``).
    token
        The run's token, written into the lock (see :func:`holds`).
    """

    def __init__(self, path: str | Path, what: str, token: str = "") -> None:
        self.path = Path(path)
        self.what = what
        self.token = token
        self.held = False

    def _owner(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "run": self.token,
        }

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; raise :class:`VirnucError` if it is held."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over()
            return self
        except OSError as error:
            raise VirnucError(f"cannot create the lock {self.path}: {error.strerror}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(self._owner(), f)
        self.held = True
        return self

    def _take_over(self) -> None:
        holder = _read(self.path)
        if holder is None and _age(self.path) < 10:
            holder = {"pid": "?", "host": "? (a run that is starting)"}
        if holder is not None and not _is_stale(holder):
            raise self._in_use(holder)
        guard = self.path.with_name(self.path.name + ".takeover")
        # Only a guard that exists and is old is a dead taker's ("missing" must not count as
        # old: another taker may create it between our look and our unlink).
        if guard.exists() and _age(guard) > _GUARD_SECONDS:
            guard.unlink(missing_ok=True)
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise self._in_use({"pid": "?", "host": "? (a run taking over a stale lock)"}) from None
        try:
            now = _read(self.path)
            if now != holder and now is not None and not _is_stale(now):
                raise self._in_use(now)
            logger.warning("taking over the stale lock %s (%s)", self.path, holder)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._owner()))
            os.replace(tmp, self.path)
            self.held = True
        finally:
            guard.unlink(missing_ok=True)

    def _in_use(self, holder: dict) -> VirnucError:
        return VirnucError(
            f"{self.what} is in use by another run (pid {holder.get('pid')} on "
            f"{holder.get('host')}, lock {self.path}); wait for it to finish, or "
            "remove the lock file if that run is gone"
        )

    def release(self) -> None:
        """Remove the lock file if this process holds it (and it is still this run's)."""
        if self.held:
            holder = _read(self.path)
            if holder is None or holder.get("run", "") == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holds(path: str | Path, token: str) -> bool:
    """Whether the lock file at ``path`` exists and belongs to the run ``token``."""
    holder = _read(Path(path))
    return holder is not None and holder.get("run") == token


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing, unreadable or half-written: treated as stale
    return data if isinstance(data, dict) else None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _is_stale(holder: dict) -> bool:
    """A lock is stale when its owner ran on this host and no longer exists."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return pid != "?"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
