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

On an object store (a lock at a URL, :class:`~virnuc_dask.storage.Remote`) there is no
``O_EXCL`` and no rename. There:

- the lock is created by a *conditional write* (S3's ``If-None-Match: *``): of two runs, the
  store lets exactly one create it; the takeover guard is created the same way;
- the lock is a *lease*: it holds ``expires``, and a thread of the run writes it again every
  :data:`RENEW_SECONDS` with a new expiry :data:`LEASE_SECONDS` ahead. A lock past its expiry
  is stale whatever host wrote it (a driver on another node that died, or lost the network,
  stops renewing), as is one of this host whose process is gone (so a killed run resumes at
  once on the same machine). A lease tolerates clock differences between hosts well under
  its length;
- the race that remains is documented: where a store ignores the condition (the check, write
  and read-back of :meth:`~virnuc_dask.storage.Remote.create` stands in), or a run is frozen
  past its expiry (a suspended laptop) and another takes over, two runs may both believe
  they hold the lock for up to one renewal. The renewal reads the lock first: a run that
  finds another's token stops renewing and logs it, and its tasks, which check the token
  before they write a shard (:func:`holds`), write nothing more.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from virnuc_dask.errors import VirnucError
from virnuc_dask.storage import Remote, StorageOptions, is_url

logger = logging.getLogger(__name__)

#: A takeover guard older than this belongs to a taker that died: it may be removed.
_GUARD_SECONDS = 30
#: Length of a lease on an object store: a lock not renewed for this long is stale.
LEASE_SECONDS = 120.0
#: How often a run renews its leases.
RENEW_SECONDS = 30.0


class RunLock:
    """An exclusive lock file held for the duration of a run.

    Parameters
    ----------
    path
        The lock file to create: a local path, or a :class:`~virnuc_dask.storage.Remote`
        (a lease, see the module's docstring).
    what
        What the lock protects, for messages (e.g. ``output out.h5``).
    token
        The run's token, written into the lock (see :func:`holds`).
    """

    def __init__(self, path: str | Path | Remote, what: str, token: str = "") -> None:
        self.path = path if isinstance(path, Remote) else Path(path)
        self.what = what
        self.token = token
        self.held = False
        self.started = time.time()
        self._renewing: threading.Event | None = None

    @property
    def remote(self) -> bool:
        """Whether the lock is a lease on an object store."""
        return isinstance(self.path, Remote)

    def _owner(self) -> dict:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self.started,
            "run": self.token,
        }
        if self.remote:
            owner["expires"] = time.time() + LEASE_SECONDS
        return owner

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; raise :class:`VirnucError` if it is held."""
        if self.remote:
            try:
                created = self.path.create(json.dumps(self._owner()).encode())
            except OSError as error:
                raise VirnucError(f"cannot create the lock {self.path}: {error}") from None
            if not created:
                self._take_over()
            self.held = True
            self._renew_in_background()
            return self
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
        if not _create(guard):
            raise self._in_use({"pid": "?", "host": "? (a run taking over a stale lock)"})
        try:
            now = _read(self.path)
            if now != holder and now is not None and not _is_stale(now):
                raise self._in_use(now)
            logger.warning("taking over the stale lock %s (%s)", self.path, holder)
            if self.remote:
                self.path.write_text(json.dumps(self._owner()))  # one PUT replaces it whole
            else:
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

    def renew(self) -> bool:
        """Renew the lease once; say whether the lock is still this run's.

        The background thread calls it every :data:`RENEW_SECONDS`; a run whose lock another
        run took over logs it and renews no more.
        """
        holder = _read(self.path)
        if holder is None or holder.get("run") != self.token:
            self._lost(holder)
            return False
        self.path.write_text(json.dumps(self._owner()))
        return True

    def _lost(self, holder: dict | None) -> None:
        logger.error(
            "%s: the lock %s is no longer this run's (%s); its chunks write nothing more",
            self.what,
            self.path,
            holder,
        )

    def _renew_in_background(self) -> None:
        """Renew the lease every :data:`RENEW_SECONDS` until :meth:`release`."""
        stop = self._renewing = threading.Event()

        def renew() -> None:
            while not stop.wait(RENEW_SECONDS):
                try:
                    if not self.renew():
                        return
                except Exception as error:  # noqa: BLE001 (a network hiccup: try again)
                    logger.warning("could not renew the lock %s: %s", self.path, error)

        threading.Thread(target=renew, name="virnuc-dask-lease", daemon=True).start()

    def release(self) -> None:
        """Remove the lock file if this process holds it (and it is still this run's)."""
        if self._renewing is not None:
            self._renewing.set()
            self._renewing = None
        if self.held:
            holder = _read(self.path)
            if holder is None or holder.get("run", "") == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holds(path: str | Path, token: str, storage: StorageOptions | None = None) -> bool:
    """Whether the lock file at ``path`` (a path or URL) exists and belongs to the run ``token``.

    ``storage`` holds the fsspec options of a URL.
    """
    holder = _read(Remote(path, storage) if is_url(path) else Path(path))
    return holder is not None and holder.get("run") == token


def _read(path: Path | Remote) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing, unreadable or half-written: treated as stale
    return data if isinstance(data, dict) else None


def _create(path: Path | Remote) -> bool:
    """Create an empty file only if there is none (``O_EXCL``, or a conditional write)."""
    if isinstance(path, Remote):
        return path.create(b"")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


def _age(path: Path | Remote) -> float:
    try:
        if isinstance(path, Remote):
            return time.time() - path.modified()
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _is_stale(holder: dict) -> bool:
    """A lock is stale when its lease expired, or its owner ran on this host and is gone."""
    expires = holder.get("expires")
    if isinstance(expires, int | float) and expires < time.time():
        return True
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
