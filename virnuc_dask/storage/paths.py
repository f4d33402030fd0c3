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
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from virnuc_dask.errors import VirnucError, option
from virnuc_dask.storage.remote import Remote
from virnuc_dask.storage.urls import STDIN, StorageOptions, is_url


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes: all absolute, none a symbolic link, none inside another."""

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
    if isinstance(out, Path) and out.is_dir():
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
        _check_input(given, named)
    return RunPaths(out, store, work)


def _place(given: str | os.PathLike, name: str, storage: StorageOptions | None) -> Path | Remote:
    """The checked place of ``given``: an absolute local path, or a writable URL."""
    if not is_url(given):
        path = _absolute(given, name)
        _check_folder(path, name)
        return path
    remote = Remote(str(given), storage)
    protocol = str(given).split("://", 1)[0].lower()
    if protocol in ("http", "https"):
        raise VirnucError(
            f"{_shown(name)} {given}: a web server's URL can be read, not written; give a "
            "local path or an object store's URL (s3://, gs://, abfs://)"
        )
    if protocol in ("s3", "s3a", "gs", "gcs"):
        bucket = remote.path.split("/", 1)[0]
        try:
            found = remote.fs.exists(bucket)
        except Exception as error:  # noqa: BLE001 (the store's client: credentials, network)
            raise VirnucError(
                f"cannot reach {_shown(name)} {given}: {type(error).__name__}: {error}"
            ) from None
        if not found:
            raise VirnucError(
                f"{_shown(name)} {given}: the bucket {bucket} does not exist; create it first"
            )
    return remote


def _overlap(a: Path | Remote, b: Path | Remote) -> bool:
    """Whether two places are one, or one lies inside the other."""
    if isinstance(a, Remote) and isinstance(b, Remote):
        return a.contains(b) or b.contains(a)
    if isinstance(a, Remote) or isinstance(b, Remote):
        return False
    return a == b or a in b.parents or b in a.parents


def _absolute(path: str | os.PathLike, name: str) -> Path:
    path = Path(os.path.abspath(Path(path).expanduser()))
    if path.is_symlink():
        raise VirnucError(
            f"{_shown(name)} {path} is a symbolic link; give the real path "
            f"({os.path.realpath(path)}) so that it is clear what gets replaced"
        )
    # Resolve the folders above it (links there are fine), not the last component.
    return Path(os.path.realpath(path.parent)) / path.name


def _check_folder(path: Path, name: str) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise VirnucError(f"{_shown(name)} folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VirnucError(f"{_shown(name)} folder {parent} is not writable")


def _check_input(given: str, named: list[tuple[str, Path | Remote]]) -> None:
    if given == STDIN:
        return
    if is_url(given):
        url = given.rstrip("/")
        for name, place in named:
            if isinstance(place, Remote) and (url == place.url or url.startswith(place.url + "/")):
                where = "is" if url == place.url else "is inside"
                raise VirnucError(
                    f"input {given} {where} the {_shown(name)} {place}; the run would destroy "
                    "it. Write the results somewhere else"
                )
        return
    named = [(name, place) for name, place in named if isinstance(place, Path)]
    source = Path(os.path.abspath(Path(given).expanduser()))
    real = Path(os.path.realpath(source))
    if not real.exists():
        return  # the index names missing or unreadable inputs in its own words
    for name, path in named:
        same = path.exists() and os.path.samefile(real, path)
        if same or real == path or path in real.parents:
            where = "is" if same or real == path else "is inside"
            raise VirnucError(
                f"input {given} {where} the {_shown(name)} {path}; the run would destroy it. "
                "Write the results somewhere else"
            )


def _shown(name: str) -> str:
    """How a path argument is named in messages: ``--work-dir`` or ``work_dir=``."""
    if name == "output":
        return "output"
    return option(name, "").strip().rstrip("=")
