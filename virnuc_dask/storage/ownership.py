"""Ownership: the tool deletes or replaces only folders it created itself.

Every folder the tool creates and may later remove (a run's work directory, a Zarr store)
carries a marker file written at creation, holding what the folder is and the fingerprint of
the run that made it. A folder without the marker is the user's: it is refused with a message
and never touched, whatever the caller asked for. This is the only module that removes a tree.

On an object store (:class:`~virnuc_dask.storage.remote.Remote`) a folder is a prefix: it is
created by writing its marker, with a conditional write so that two runs cannot both create
it, and removed by deleting every object under it, once its marker has been checked.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from virnuc_dask.errors import VirnucError
from virnuc_dask.storage.remote import Remote, write_atomic

#: Name of the marker file inside every folder the tool created.
MARKER = ".virnuc-dask"


def claim(folder: str | Path | Remote, kind: str, fingerprint: str | None = None) -> Path | Remote:
    """Create ``folder`` (it must not exist) and mark it as the tool's own.

    Parameters
    ----------
    folder
        The folder to create; its parent must exist. A :class:`~virnuc_dask.storage.remote.Remote`
        prefix is created by its marker (``FileExistsError`` when another run made it first).
    kind
        What it is, e.g. ``"work directory"`` or ``"zarr store"``.
    fingerprint
        The run's fingerprint, when known.
    """
    if isinstance(folder, Remote):
        if not (folder / MARKER).create(_marker_bytes(kind, fingerprint)):
            raise FileExistsError(f"{folder} exists")
        return folder
    folder = Path(folder)
    folder.mkdir()
    write_marker(folder, kind, fingerprint)
    return folder


def _marker_bytes(kind: str, fingerprint: str | None) -> bytes:
    data = {"kind": kind, "fingerprint": fingerprint, "pid": os.getpid(), "created": time.time()}
    return json.dumps(data).encode()


def write_marker(folder: str | Path | Remote, kind: str, fingerprint: str | None = None) -> None:
    """Write (or rewrite) the marker of a folder the tool created."""
    folder = folder if isinstance(folder, Remote) else Path(folder)
    write_atomic(folder / MARKER, _marker_bytes(kind, fingerprint))


def marker(folder: str | Path | Remote) -> dict | None:
    """The marker of ``folder``, or None when the folder is not the tool's (or is no folder)."""
    folder = folder if isinstance(folder, Remote) else Path(folder)
    path = folder / MARKER
    if folder.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "kind" in data else None


def require_owned(folder: str | Path | Remote, kind: str, hint: str = "") -> dict:
    """Return the marker of an existing ``folder`` of ``kind``; refuse anything else.

    Raises
    ------
    VirnucError
        When the folder is not marked as a ``kind`` the tool created: it is left untouched.
    """
    found = marker(folder)
    if found is None or found.get("kind") != kind:
        is_file = (folder if isinstance(folder, Remote) else Path(folder)).is_file()
        what = "it is a file" if is_file else f"it is not a {kind} this tool made"
        raise VirnucError(
            f"refusing to use {folder} as {kind}: {what} (no {MARKER} marker inside), so it "
            f"may hold your files; nothing in it was touched. {hint}".rstrip()
        )
    return found


def remove(folder: str | Path | Remote, kind: str) -> None:
    """Remove a folder the tool created; refuse (and touch nothing) when it is not marked."""
    folder = folder if isinstance(folder, Remote) else Path(folder)
    if not folder.exists():
        return
    require_owned(folder, kind)
    if isinstance(folder, Remote):
        folder.rmtree()
    else:
        shutil.rmtree(folder)
