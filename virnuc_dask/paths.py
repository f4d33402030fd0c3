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
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from virnuc_dask.errors import VirnucError, option


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes: all absolute, none a symbolic link, none inside another."""

    output: Path
    zarr: Path | None
    work_dir: Path


def run_paths(
    output: str | os.PathLike,
    zarr: str | os.PathLike | None,
    work_dir: str | os.PathLike | None,
    inputs: list[str],
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
    """
    out = _absolute(output, "output")
    _check_folder(out, "output")
    if out.is_dir():
        raise VirnucError(f"output {out} is a directory; give a file name such as out.h5")
    store = _absolute(zarr, "zarr") if zarr is not None else None
    if store is not None:
        _check_folder(store, "zarr")
    work = _absolute(work_dir, "work_dir") if work_dir else out.with_name(out.name + ".work")
    _check_folder(work, "work_dir")

    named = [("output", out), ("work_dir", work)] + ([("zarr", store)] if store else [])
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1 :]:
            if a == b or a in b.parents or b in a.parents:
                raise VirnucError(
                    f"{_shown(name_a)} {a} and {_shown(name_b)} {b} overlap; give "
                    "three separate places, none inside another"
                )
    for given in inputs:
        _check_input(given, named)
    return RunPaths(out, store, work)


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


def _check_input(given: str, named: list[tuple[str, Path]]) -> None:
    if given == "-":
        return
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
