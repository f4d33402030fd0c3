"""The run's paths: output, Zarr store, work directory and inputs, checked before any work.

Every relation that could make one path destroy another is refused up front, with exit 2 on
the command line and nothing created:

- the output, the Zarr store and the work directory are three different places, none inside
  another (a Zarr store inside the work directory would be removed with it; an output inside
  the Zarr store would be replaced with it);
- no input is any of them or lies inside the work directory or the Zarr store (``-o`` naming
  the FASTA file would overwrite it);
- a symbolic link given as output, Zarr store or work directory is refused rather than
  followed: replacing it by rename would replace the link, not the file the user meant;
- the folders that will hold them exist and are writable.

Any of them may be an fsspec URL (:class:`~virnuc_dask.storage.remote.Remote`): the same relations
are checked between URLs (a URL is inside another when it starts with it and a ``/``); a URL
and a local path never overlap. A URL of a web server (``http://``, ``https://``) can be read
but not written, and an object store's bucket must exist.

Every check is written once, with the methods of :class:`~virnuc_dask.storage.places.Place`
(:meth:`~virnuc_dask.storage.places.Place.contains`,
:meth:`~virnuc_dask.storage.places.Place.samefile`,
:meth:`~virnuc_dask.storage.places.Place.check_writable`), which a local path and a URL each
answer in their own terms. An input that does not exist is checked as one that does: one that
would be the output is refused here, before the index says it is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from virnuc_dask.errors import VirnucError, option
from virnuc_dask.storage.places import Place
from virnuc_dask.storage.remote import Remote, place
from virnuc_dask.storage.urls import STDIN, StorageOptions


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes: all absolute, none a symbolic link, none inside another.

    Local places are ``Path`` objects, as the callers give and compare them.
    """

    output: Path | Remote
    zarr: Path | Remote | None
    work_dir: Path | Remote


def run_paths(
    output: str | os.PathLike,
    zarr: str | os.PathLike | None,
    work_dir: str | os.PathLike | None,
    inputs: list[str],
    storage: StorageOptions | None = None,
) -> RunPaths:
    """Resolve the run's paths and refuse every dangerous relation (see the module docstring).

    Parameters
    ----------
    output
        The HDF5 file to write.
    zarr
        The Zarr store to write, if any.
    work_dir
        The work directory; default ``OUTPUT.work`` beside the output.
    inputs
        The input files as given (``-`` and other pipes are skipped in the comparisons).
    storage
        fsspec options for the places given as URLs.
    """
    out = _place(output, "output", storage)
    if out.is_dir():
        raise VirnucError(f"output {out} is a directory; give a file name such as out.h5")
    store = _place(zarr, "zarr", storage) if zarr is not None else None
    beside = out.with_name(out.name + ".work")
    work = _place(work_dir, "work_dir", storage) if work_dir else beside

    named = [("output", out), ("work_dir", work)] + ([("zarr", store)] if store else [])
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1 :]:
            if _overlap(a, b):
                raise VirnucError(
                    f"{_shown(name_a)} {a} and {_shown(name_b)} {b} overlap; give "
                    "three separate places, none inside another"
                )
    for given in inputs:
        _check_input(given, named, storage)
    return RunPaths(out.native, store.native if store else None, work.native)


def _place(given: str | os.PathLike, name: str, storage: StorageOptions | None) -> Place:
    """The checked place of ``given``: an absolute local path, or a writable URL."""
    where = place(given, storage).absolute()
    if where.is_symlink():
        raise VirnucError(
            f"{_shown(name)} {where} is a symbolic link; give the real path "
            f"({where.resolve()}) so that it is clear what gets replaced"
        )
    # Not a link itself: resolving it resolves the folders above it (links there are fine).
    where = where.resolve()
    where.check_writable(_shown(name))
    return where


def _overlap(a: Place, b: Place) -> bool:
    """Whether two places are one, or one lies inside the other (never a URL and a path)."""
    return a.contains(b) or b.contains(a)


def _check_input(given: str, named: list[tuple[str, Place]], storage: StorageOptions | None):
    if given == STDIN:
        return
    # Where the bytes are: a local input's links resolved (a link to the output is the output).
    source = place(given, storage).absolute().resolve()
    for name, where in named:
        same = where.samefile(source) or where == source
        if same or where.contains(source):
            raise VirnucError(
                f"input {given} {'is' if same else 'is inside'} the {_shown(name)} {where}; "
                "the run would destroy it. Write the results somewhere else"
            )


def _shown(name: str) -> str:
    """How a path argument is named in messages: ``--work-dir`` or ``work_dir=``."""
    if name == "output":
        return "output"
    return option(name, "").strip().rstrip("=")
