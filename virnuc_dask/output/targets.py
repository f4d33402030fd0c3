"""Targets: where outputs may be written, and how they appear there all at once.

Outputs are written to hidden siblings (``.NAME.<hex>.partial``, a Zarr one marked with the
:mod:`~virnuc_dask.storage.ownership` marker from its creation) and renamed into place only when all
are complete, so they appear together or not at all, and an existing output stays intact
until it is replaced. :func:`check_target` says what may be replaced: an existing file or
Zarr store only with ``overwrite``, a folder without the tool's marker never, a symbolic link
never.

:func:`check_target` holds for outputs at URLs too: its rules are written once with the
methods of :class:`~virnuc_dask.storage.places.Place` (a URL is never a symbolic link; its
"folder" is a prefix with objects under it). Outputs at URLs are built locally and published
by :mod:`.publish` (no rename there), so nothing partial is ever at a URL:
:func:`remove_stale_partials` looks for none there, rather than list the output's prefix.
This module defines the kinds of target (:data:`OUTPUT`, :data:`ZARR_STORE`) and the message
for an output that appeared meanwhile (:func:`appeared`), for both.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from virnuc_dask.errors import VirnucError, option
from virnuc_dask.storage import ownership
from virnuc_dask.storage.local import NO_HARD_LINKS
from virnuc_dask.storage.places import Place
from virnuc_dask.storage.remote import place
from virnuc_dask.storage.urls import is_url

logger = logging.getLogger(__name__)

#: The kinds of target :func:`check_target` knows; the Zarr one is also its ownership kind.
OUTPUT = "output"
ZARR_STORE = "zarr store"


def check_target(path: str | Path | Place, kind: str, *, overwrite: bool) -> None:
    """Refuse an output path that the run must not write; call it before any work.

    Parameters
    ----------
    path
        Where the output will be renamed into place, or its URL (where it will be put).
    kind
        ``"output"`` (the HDF5 file) or ``"zarr store"``.
    overwrite
        Whether an existing file, or a Zarr store this tool made, may be replaced.

    Raises
    ------
    VirnucError
        For a symbolic link (replacing it by a rename would replace the link, not the file it
        points to); for an existing output without ``overwrite``; for an output path that is a
        folder or not a regular file; for a Zarr path that exists but is not a store this tool
        made (no ownership marker), whatever ``overwrite`` says: it is never touched.
    """
    if kind not in (OUTPUT, ZARR_STORE):
        raise ValueError(f"unknown kind of output {kind!r}")
    path = place(path)
    if path.is_symlink():
        raise VirnucError(
            f"{kind} {path} is a symbolic link; give the path it points to (or another path): "
            "the tool replaces outputs by renaming, which would replace the link, not its target"
        )
    if not path.exists():
        return
    if kind == OUTPUT:
        if path.is_dir():
            raise VirnucError(f"output {path} is a directory; give a file name such as out.h5")
        if not path.is_file():
            raise VirnucError(f"output {path} is not a regular file; give a file name")
        if not overwrite:
            raise VirnucError(
                f"output {path} already exists; pass {option('overwrite')} to replace it (the "
                "old file stays intact until the new one is complete)"
            )
        return
    ownership.require_owned(
        path,
        ZARR_STORE,
        hint=f"Give another path: {option('overwrite')} never replaces it.",
    )
    if not overwrite:
        raise VirnucError(
            f"Zarr store {path} already exists; pass {option('overwrite')} to replace it (the "
            "old store stays intact until the new one is complete)"
        )


def remove_stale_partials(path: Path) -> list[Path]:
    """Remove the partial files and stores a killed assembly left beside ``path``.

    Only names of exactly the form ``.NAME.<32 hex digits>.partial`` for this output's
    ``NAME`` are considered; of those, regular files are removed, and folders only when they
    carry the tool's Zarr store marker. Call it while holding the output's lock: a running
    assembly's partial files have the same form.

    Parameters
    ----------
    path
        The output file or Zarr store.

    Returns
    -------
    list of Path
        What was removed.
    """
    if is_url(path):
        return []  # nothing partial is ever at a URL: outputs are uploaded whole
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{32}}\.partial")
    try:
        entries = sorted(path.parent.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        if not pattern.fullmatch(entry.name) or entry.is_symlink():
            continue
        if entry.is_dir():
            found = ownership.marker(entry)
            if found is None or found.get("kind") != ZARR_STORE:
                logger.warning("leaving %s: it looks partial but is not marked as ours", entry)
                continue
            ownership.remove(entry, ZARR_STORE)
        elif entry.is_file():
            entry.unlink()
        else:
            continue
        logger.info("removed %s, left by an interrupted assembly", entry)
        removed.append(entry)
    return removed


def partial_name(target: Path) -> Path:
    """The hidden sibling a file or store is written to before its rename."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")


@contextlib.contextmanager
def fresh_partial(target: Path, kind: str, attrs: dict) -> Iterator[Path]:
    """A fresh partial sibling of ``target``, removed on exit unless it was renamed away.

    A Zarr one is created and marked at once, so that it is never an unmarked folder that
    :func:`remove_stale_partials` or this cleanup would have to leave behind.
    """
    partial = partial_name(target)
    try:
        if kind == ZARR_STORE:
            ownership.claim(partial, ZARR_STORE, attrs.get("fingerprint"))
        yield partial
    finally:
        discard(partial)


def discard(partial: Path) -> None:
    """Remove a partial file, or a partial store that carries the marker (and nothing else)."""
    if partial.is_dir() and not partial.is_symlink():
        found = ownership.marker(partial)
        if found is not None and found.get("kind") == ZARR_STORE:
            ownership.remove(partial, ZARR_STORE)
        else:
            logger.warning("leaving %s: it is not marked as a store this tool made", partial)
    else:
        partial.unlink(missing_ok=True)


def commit(written: list[tuple[Path, Path, str]], *, overwrite: bool) -> None:
    """Rename every complete partial into place, after checking every target once more."""
    # Someone may have created an output while the run was computing: check both before
    # renaming either, so that both outputs appear or neither does.
    for _, target, kind in written:
        try:
            check_target(target, kind, overwrite=overwrite)
        except VirnucError as error:
            raise VirnucError(f"{error}. {appeared(target)}") from None
    for partial, target, kind in written:
        if kind == OUTPUT:
            _rename_file(partial, target, overwrite=overwrite)
        else:
            _rename_store(partial, target)


def appeared(target: Path | Place) -> str:
    """What to do about an output that appeared while the run was computing (its shards kept)."""
    return (
        f"{target} appeared while the run was computing; the finished shards are kept: run "
        f"again with {option('resume')} (and {option('overwrite')} to replace it)"
    )


def _rename_file(partial: Path, target: Path, *, overwrite: bool) -> None:
    if overwrite:
        # Freeing a replaced file of gigabytes takes the kernel a second or more: the old file
        # stays open until the rename is done and is closed (freed) in the background.
        try:
            replaced = open(target, "rb")  # noqa: SIM115 (closed by _close_later)
        except OSError:
            replaced = None
        os.replace(partial, target)
        if replaced is not None:
            _close_later(replaced)
        return
    # A hard link creates the name only if it is free: no file created since the check is
    # ever replaced. Where the filesystem has no hard links, the check just made stands.
    try:
        os.link(partial, target)
    except FileExistsError:
        raise VirnucError(
            f"output {target} already exists; pass {option('overwrite')} to replace it. "
            f"{appeared(target)}"
        ) from None
    except OSError as error:
        if error.errno not in NO_HARD_LINKS:
            raise
        os.replace(partial, target)
    else:
        partial.unlink()


def _close_later(file) -> None:
    """Close ``file`` in a background thread (at the latest, the process's exit closes it)."""
    threading.Thread(target=file.close, name="virnuc-dask-free-replaced", daemon=True).start()


def _rename_store(partial: Path, target: Path) -> None:
    if not target.exists():
        try:
            os.rename(partial, target)
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise VirnucError(f"Zarr store {target} exists. {appeared(target)}") from None
        return
    # The old store is ours and may be replaced (checked just before): move it aside, move
    # the new one in, and only then remove the old one.
    aside = partial_name(target)
    os.rename(target, aside)
    try:
        os.rename(partial, target)
    except BaseException:
        os.rename(aside, target)
        raise
    ownership.remove(aside, ZARR_STORE)
