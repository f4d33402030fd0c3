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

The lock is a :class:`~virnuc_dask.storage.places.Place` and every step one method of it, so
the rules are written once for a local file and a URL: its creation
(:meth:`~virnuc_dask.storage.places.Place.create`: ``O_EXCL`` locally), a takeover's
replacement (:meth:`~virnuc_dask.storage.places.Place.write_if`: a rename locally, where
there are no versions) and a release
(:meth:`~virnuc_dask.storage.places.Place.unlink_if`). The one difference left is a policy,
decided once (:attr:`RunLock.lease`): a lock at a URL is a lease, a local one is not (its
owner's liveness is checked by its pid, as it always was).

On an object store (a lock at a URL, :class:`~virnuc_dask.storage.remote.Remote`) there is no
``O_EXCL`` and no rename. There:

- the lock is created by a *conditional write* (S3's ``If-None-Match: *``): of two runs, the
  store lets exactly one create it; the takeover guard is created the same way;
- the lock is a *lease*: it holds ``expires``, and a thread of the run writes it again every
  :data:`RENEW_SECONDS` with a new expiry :data:`LEASE_SECONDS` ahead. A lock past its expiry
  is stale whatever host wrote it (a driver on another node that died, or lost the network,
  stops renewing), as is one of this host whose process is gone (so a killed run resumes at
  once on the same machine). A lease tolerates clock differences between hosts well under
  its length;
- renewals, releases and takeovers are *compare-and-swap* on the object's version (its ETag
  on S3: ``If-Match`` on the PUT and the DELETE,
  :meth:`~virnuc_dask.storage.remote.Remote.write_if`).
  A renewal writes, and a release deletes, only the version this run wrote last; a takeover
  replaces only the version it judged stale. So a renewal or a release that reaches the
  store just after another run's takeover changes nothing: the renewal logs that the lock
  is no longer this run's and renews no more (its tasks, which check the token before they
  write a shard, :func:`holds`, write nothing more), and the release leaves the taker's lock.
  A takeover that crosses the owner's renewal is refused (the lease was not stale after all).
  A renewal and the release of one run never cross (a lock between them), so the release
  deletes the last version written;
- the renewal still reads the lock first and stops on another's token: on a store that
  takes ``If-Match`` but ignores it, that is all that guards the window;
- the race that remains: where a store has no conditional write (the check, write and
  read-back of :meth:`~virnuc_dask.storage.remote.Remote.create` stands in) or no versions (every
  store but S3 today, GCS included, whose ``ifGenerationMatch`` is not used yet: see
  :mod:`~virnuc_dask.storage`), renewals, releases and takeovers are plain writes after a
  read, as before: a renewal or release just after a takeover can undo it, and two runs may
  both believe they hold the lock for up to one renewal. On any store, a run frozen past its
  expiry (a suspended laptop) loses the lock to a taker, and learns it at its next renewal;
  its tasks check the token before each shard, so only a shard already past that check may
  still be written.

A renewal whose PUT was retried after its answer was lost (botocore retries) finds the
condition failed by its own first attempt: it reads the lock back, and bytes equal to what it
wrote are still this run's lease, not a takeover.
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
from virnuc_dask.storage.places import Place, VersionChanged
from virnuc_dask.storage.remote import place
from virnuc_dask.storage.urls import StorageOptions, is_url

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
        The lock file to create: a local path, a URL or a
        :class:`~virnuc_dask.storage.places.Place` (at a URL: a lease, see the module's
        docstring).
    what
        What the lock protects, for messages (e.g. ``output out.h5``).
    token
        The run's token, written into the lock (see :func:`holds`).
    """

    def __init__(self, path: str | Path | Place, what: str, token: str = "") -> None:
        self.path = place(path)
        #: Whether the lock is a lease (see the module's docstring): the one place where a
        #: lock at a URL and a local one differ.
        self.lease = is_url(self.path)
        self.what = what
        self.token = token
        self.held = False
        self.started = time.time()
        self._renewing: threading.Event | None = None
        #: The version of the lease this run wrote last (its ETag), on a store with versions.
        self._version: str | None = None
        #: Keeps a renewal and the release from crossing (a release must delete the last
        #: version written, and no renewal may write after it).
        self._mutex = threading.Lock()

    def _owner(self) -> dict:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self.started,
            "run": self.token,
        }
        if self.lease:
            owner["expires"] = time.time() + LEASE_SECONDS
        return owner

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; raise :class:`VirnucError` if it is held."""
        data = json.dumps(self._owner()).encode()
        try:
            created = self.path.create(data)
            if created:
                self._version = self._version_of(data)
        except OSError as error:
            raise VirnucError(
                f"cannot create the lock {self.path}: {error.strerror or error}"
            ) from None
        if not created:
            self._take_over()
        self.held = True
        if self.lease:
            self._renew_in_background()
        return self

    def _version_of(self, data: bytes) -> str | None:
        """The version of the lease this run has just written as ``data``."""
        if not self.path.versioned:
            return None
        found, version = self.path.read_versioned()
        if found != data:  # taken over already: only a run that judged it stale may
            raise self._in_use(_parse(found) or {"pid": "?", "host": "?"})
        return version

    def _look(self) -> tuple[dict | None, str | None]:
        """The lock's owner and, on a store with versions, the version read with it."""
        if not self.path.versioned:
            return _read(self.path), None
        try:
            data, version = self.path.read_versioned()
        except OSError:
            return None, None  # missing or unreadable; a takeover then only creates
        return _parse(data), version

    def _take_over(self) -> None:
        holder, _ = self._look()
        if holder is None and _age(self.path) < 10:
            holder = {"pid": "?", "host": "? (a run that is starting)"}
        if holder is not None and not _is_stale(holder):
            raise self._in_use(holder)
        guard = self.path.with_name(self.path.name + ".takeover")
        # Only a guard that exists and is old is a dead taker's ("missing" must not count as
        # old: another taker may create it between our look and our unlink).
        if guard.exists() and _age(guard) > _GUARD_SECONDS:
            guard.unlink(missing_ok=True)
        if not guard.create(b""):
            raise self._in_use({"pid": "?", "host": "? (a run taking over a stale lock)"})
        try:
            now, version = self._look()
            if now != holder and now is not None and not _is_stale(now):
                raise self._in_use(now)
            logger.warning("taking over the stale lock %s (%s)", self.path, holder)
            self._replace(version)
            self.held = True
        finally:
            guard.unlink(missing_ok=True)

    def _replace(self, version: str | None) -> None:
        """Replace the stale lock, whole, only if it is still the ``version`` judged stale.

        A renewal by its owner, or another taker, that reached the store since wins: this run
        is refused. A local file, or a store without versions, is replaced unconditionally
        (a rename locally, one PUT remotely; the guard alone keeps takers apart there).
        """
        data = json.dumps(self._owner()).encode()
        try:
            if not self.path.versioned:
                self.path.write_bytes(data)
            elif version is None:  # gone since it was judged stale: only a create may replace it
                if not self.path.create(data):
                    raise VersionChanged(str(self.path))
                self._version = self._version_of(data)
            else:
                self._version = self.path.write_if(data, version)
        except VersionChanged:
            raise self._in_use(
                _read(self.path) or {"pid": "?", "host": "? (a run that renewed it meanwhile)"}
            ) from None

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
        with self._mutex:
            if not self.held:
                return False
            # Read first: a run that finds another's token stops without a write, also on a
            # store that ignores the condition of the write below.
            holder = _read(self.path)
            if holder is None or holder.get("run") != self.token:
                return self._lost(holder)
            data = json.dumps(self._owner()).encode()
            try:
                self._version = self.path.write_if(data, self._version)
            except VersionChanged:
                # A PUT retried after its answer was lost finds its own bytes: still ours.
                found, version = self._look()
                if found != json.loads(data):
                    return self._lost(found)
                self._version = version
            return True

    def _lost(self, holder: dict | None) -> bool:
        self.held = False  # nothing of it is this run's to renew or remove
        logger.error(
            "%s: the lock %s is no longer this run's (%s); its chunks write nothing more",
            self.what,
            self.path,
            holder,
        )
        return False

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
        with self._mutex:
            if not self.held:
                return
            self.held = False
            holder = _read(self.path)
            if holder is not None and holder.get("run", "") != self.token:
                return
            try:
                self.path.unlink_if(self._version)  # only the version this run wrote last
            except VersionChanged:
                logger.warning(
                    "%s: the lock %s is no longer this run's; left as it is", self.what, self.path
                )

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holds(path: str | Path, token: str, storage: StorageOptions | None = None) -> bool:
    """Whether the lock file at ``path`` (a path or URL) exists and belongs to the run ``token``.

    ``storage`` holds the fsspec options of a URL.
    """
    holder = _read(place(path, storage))
    return holder is not None and holder.get("run") == token


def _read(path: Place) -> dict | None:
    try:
        return _parse(path.read_text())
    except OSError:
        return None  # missing or unreadable: treated as stale


def _parse(data: bytes | str) -> dict | None:
    try:
        owner = json.loads(data)
    except ValueError:
        return None  # half-written: treated as stale
    return owner if isinstance(owner, dict) else None


def _age(path: Place) -> float:
    try:
        return time.time() - path.modified()
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
