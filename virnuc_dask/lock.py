"""Run locks: one run at a time per output file and per work directory.

A lock is a small JSON file (owner pid, host, start time) created with ``O_EXCL``, so two runs
cannot both believe they hold it. A lock left by a process that no longer exists on this host is
stale: it is taken over with a warning. A lock held by a live process, or by a process on another
host (whose liveness cannot be checked from here), refuses the second run with a message naming
the owner.
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


class RunLock:
    """An exclusive lock file held for the duration of a run.

    Parameters
    ----------
    path
        The lock file to create.
    what
        What the lock protects, for messages (e.g. ``output out.h5``).
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self.held = False

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; raise :class:`VirnucError` if it is held."""
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None and _age(self.path) < 10:
                    holder = {"pid": "?", "host": "? (a run that is starting)"}
                if holder is not None and not _is_stale(holder):
                    raise VirnucError(
                        f"{self.what} is in use by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, lock {self.path}); wait for it to finish, or "
                        "remove the lock file if that run is gone"
                    ) from None
                logger.warning("taking over the stale lock %s (%s)", self.path, holder)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            self.held = True
            return self
        raise VirnucError(f"could not take the lock {self.path}; another run is starting")

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable or half-written: treated as stale


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
