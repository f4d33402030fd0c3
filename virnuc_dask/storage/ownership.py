"""Ownership: the tool deletes or replaces only folders it created itself.

Every folder the tool creates and may later remove (a run's work directory, a Zarr store)
carries a marker file written at creation, holding what the folder is and the fingerprint of
the run that made it. A folder without the marker is the user's: it is refused with a message
and never touched, whatever the caller asked for. This is the only module that removes a tree.

A folder is a :class:`~virnuc_dask.storage.places.Place`, local or at a URL, and every step is
one method of it, so the rules are written once:

- it is created by :meth:`~virnuc_dask.storage.places.Place.mkdir` (``FileExistsError`` when
  it exists; nothing on an object store, where a folder is a prefix) and then by its marker,
  created exclusively (``O_EXCL``, or a conditional write): of two runs, one makes it;
- the marker is rewritten whole (a rename, or one PUT);
- a folder is removed (:meth:`~virnuc_dask.storage.places.Place.rmtree`: ``shutil.rmtree``, or
  every object under the prefix) only once its marker has been checked.

Functions take a path, a URL or a place, and hand folders back as the package holds them
(a ``Path`` when local).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from virnuc_dask.errors import VirnucError
from virnuc_dask.storage.places import Place
from virnuc_dask.storage.remote import Remote, place

#: Name of the marker file inside every folder the tool created.
MARKER = ".virnuc-dask"


def claim(folder: str | Path | Place, kind: str, fingerprint: str | None = None) -> Path | Remote:
    """Create ``folder`` (it must not exist) and mark it as the tool's own.

    Parameters
    ----------
    folder
        The folder to create; its parent must exist. A prefix at a URL is created by its
        marker (``FileExistsError`` when another run made it first).
    kind
        What it is, e.g. ``"work directory"`` or ``"zarr store"``.
    fingerprint
        The run's fingerprint, when known.

    Returns
    -------
    Path or Remote
        The folder created.
    """
    where = place(folder)
    where.mkdir()
    if not (where / MARKER).create(_marker_bytes(kind, fingerprint)):
        raise FileExistsError(f"{where} exists")
    return where.native


def _marker_bytes(kind: str, fingerprint: str | None) -> bytes:
    data = {"kind": kind, "fingerprint": fingerprint, "pid": os.getpid(), "created": time.time()}
    return json.dumps(data).encode()


def write_marker(folder: str | Path | Place, kind: str, fingerprint: str | None = None) -> None:
    """Write (or rewrite) the marker of a folder the tool created, whole."""
    (place(folder) / MARKER).write_bytes(_marker_bytes(kind, fingerprint))


def marker(folder: str | Path | Place) -> dict | None:
    """The marker of ``folder``, or None when the folder is not the tool's (or is no folder)."""
    folder = place(folder)
    path = folder / MARKER
    if folder.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "kind" in data else None


def require_owned(folder: str | Path | Place, kind: str, hint: str = "") -> dict:
    """Return the marker of an existing ``folder`` of ``kind``; refuse anything else.

    Raises
    ------
    VirnucError
        When the folder is not marked as a ``kind`` the tool created: it is left untouched.
    """
    found = marker(folder)
    if found is None or found.get("kind") != kind:
        what = "it is a file" if place(folder).is_file() else f"it is not a {kind} this tool made"
        raise VirnucError(
            f"refusing to use {folder} as {kind}: {what} (no {MARKER} marker inside), so it "
            f"may hold your files; nothing in it was touched. {hint}".rstrip()
        )
    return found


def remove(folder: str | Path | Place, kind: str) -> None:
    """Remove a folder the tool created; refuse (and touch nothing) when it is not marked."""
    folder = place(folder)
    if not folder.exists():
        return
    require_owned(folder, kind)
    folder.rmtree()
