"""What a local path and a URL have in common: the methods of :class:`Place`.

The tool keeps a file or folder it writes as a :class:`~virnuc_dask.storage.local.Local` (a
local path) or a :class:`~virnuc_dask.storage.remote.Remote` (an fsspec URL), made by the one
factory :func:`~virnuc_dask.storage.remote.place`. Both have exactly the methods of
:class:`Place`, with the same meaning, so that code which locks, marks, checks or publishes a
place is written once and holds for both.

Decisions:

- **A twin, not a branch**: where a local path has a faster way to do the same thing (a rename
  instead of one PUT, ``O_EXCL`` instead of a conditional write, a memory map instead of a
  download), the difference lives in one method of each class, not in a test of the caller.
- **A wrapper, not a ``Path`` subclass**: a subclass would carry all of ``pathlib`` along, and
  code written against it (``iterdir``, ``stat``) would work on a local path and fail only on
  a URL, at run time. The twin has the methods below and no others; its ``Path`` is
  :attr:`~virnuc_dask.storage.local.Local.path`, for the local fast paths, and it is
  ``os.PathLike`` so that h5py, numpy and ``open`` take it where a local file is needed.
- **``Path`` at the edges**: where the package hands a place out (the run's paths, the
  folders it claims) a local one is a ``Path``, as users and tests hold it
  (:attr:`Place.native`); a URL is the :class:`~virnuc_dask.storage.remote.Remote`.
- **Equality by kind and name**: a place equals a place of the same class at the same path
  or URL, never a place of the other class (a URL and a local path never overlap), and
  never a ``Path`` (use :attr:`Place.native` to compare with one).
"""

from __future__ import annotations

import abc
import os
from typing import BinaryIO


class VersionChanged(Exception):
    """The object is no longer the version a conditional write or delete named (or is gone)."""


class Place(abc.ABC):
    """A file or folder the tool reads or writes: a local path or an fsspec URL.

    The pathlib-like methods (``name``, ``parent``, ``/``, ``exists``, ...) mean what they
    mean in ``pathlib``; the others are described on each method. Subclasses say how.
    """

    # -- names ---------------------------------------------------------------------------

    @abc.abstractmethod
    def _key(self) -> object:
        """What two places of one class are equal by (and sorted by)."""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))

    def __lt__(self, other: Place) -> bool:
        return self._key() < other._key()

    @abc.abstractmethod
    def __truediv__(self, name: str) -> Place:
        """The place ``name`` inside this one."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The last part of the path or URL."""

    @property
    @abc.abstractmethod
    def parent(self) -> Place:
        """The place one level up."""

    def with_name(self, name: str) -> Place:
        """The sibling called ``name``."""
        return self.parent / name

    @abc.abstractmethod
    def contains(self, other: Place) -> bool:
        """Whether ``other`` is this place or lies under it (never for the other kind)."""

    @property
    @abc.abstractmethod
    def native(self):
        """The place as the package hands it out: a ``Path`` when local, else itself."""

    @abc.abstractmethod
    def absolute(self) -> Place:
        """The place as an absolute path (``~`` expanded); a URL is one already."""

    @abc.abstractmethod
    def resolve(self) -> Place:
        """The place with every symbolic link resolved; a URL has none."""

    # -- reading and writing -------------------------------------------------------------

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether a file is here, or files lie under it."""

    @abc.abstractmethod
    def is_file(self) -> bool:
        """Whether a file is here."""

    @abc.abstractmethod
    def is_dir(self) -> bool:
        """Whether this is a folder (for a URL: whether objects lie under it)."""

    @abc.abstractmethod
    def is_symlink(self) -> bool:
        """Whether this is a symbolic link (never, at a URL)."""

    @abc.abstractmethod
    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Create the folder (nothing at a URL: a prefix exists once an object is under it)."""

    @abc.abstractmethod
    def read_bytes(self) -> bytes:
        """The file's bytes (``FileNotFoundError`` when there is none)."""

    def read_text(self) -> str:
        """The file's bytes as UTF-8 text."""
        return self.read_bytes().decode()

    @abc.abstractmethod
    def write_bytes(self, data: bytes) -> None:
        """Write the whole file: readers see the old bytes or the new, never a mix."""

    def write_text(self, text: str) -> None:
        """Write UTF-8 text, whole (as :meth:`write_bytes`)."""
        self.write_bytes(text.encode())

    @abc.abstractmethod
    def create(self, data: bytes) -> bool:
        """Create the file only if there is none; say whether this call created it."""

    @property
    @abc.abstractmethod
    def versioned(self) -> bool:
        """Whether the file has versions for compare-and-swap (:meth:`write_if`)."""

    @abc.abstractmethod
    def read_versioned(self) -> tuple[bytes, str | None]:
        """The file's bytes and their version (``None`` without versions)."""

    @abc.abstractmethod
    def write_if(self, data: bytes, version: str | None) -> str | None:
        """Write only if the file is still ``version`` (plainly without versions).

        Raises :class:`VersionChanged` when it is not; returns the new version.
        """

    @abc.abstractmethod
    def unlink_if(self, version: str | None) -> None:
        """Remove only if the file is still ``version`` (plainly without versions)."""

    @abc.abstractmethod
    def put(self, local: str | os.PathLike, *, exclusive: bool = False) -> None:
        """Copy a local file here, whole (``FileExistsError`` with ``exclusive`` if one is)."""

    @abc.abstractmethod
    def get(self, local: str | os.PathLike) -> None:
        """Copy the file to a local file."""

    @abc.abstractmethod
    def open_read(self, block_size: int = 1 << 22, digest=None) -> BinaryIO:
        """The file opened for reading front to back, buffered; the caller closes it.

        ``digest`` (a ``hashlib`` object), when given, holds every byte of the file once the
        file has been read to its end (a URL's stream is hashed as it is read, and then
        cannot seek; a local file is hashed before it is opened).
        """

    @abc.abstractmethod
    def read_ranges(self, starts: list[int], ends: list[int]) -> list[bytes]:
        """The bytes ``[start, end)`` of the file for each pair, in the order given."""

    @abc.abstractmethod
    def source(self) -> str | BinaryIO:
        """What a reader that takes a path or a file (h5py, xarray) opens to read it here.

        A local path itself (the reader's own, fastest access), or the object opened for
        reading by byte ranges (a file the caller closes).
        """

    @abc.abstractmethod
    def local_source(self) -> str | BinaryIO:
        """A local file with these bytes: a local path itself, or a temporary copy.

        The copy is an open file, unnamed (removed when closed), not bytes in memory: a
        per-residue shard holds gigabytes. The caller closes a file it gets.
        """

    @abc.abstractmethod
    def unlink(self, missing_ok: bool = False) -> None:
        """Remove the file."""

    @abc.abstractmethod
    def glob(self, pattern: str) -> list[Place]:
        """The files and folders right under this folder whose names match ``pattern``."""

    @abc.abstractmethod
    def files(self) -> list[str]:
        """Every file under this folder, as ``/``-separated paths relative to it, sorted."""

    @abc.abstractmethod
    def rmtree(self) -> None:
        """Remove the folder and everything under it (nothing when there is none)."""

    @abc.abstractmethod
    def modified(self) -> float:
        """When the file was last written, in seconds since the epoch."""

    # -- checks with messages --------------------------------------------------------------

    @abc.abstractmethod
    def samefile(self, other: Place) -> bool:
        """Whether ``other`` is this very file, under this name or another (a hard link)."""

    @abc.abstractmethod
    def check_writable(self, what: str) -> None:
        """Refuse a place the run cannot write, naming it as ``what`` (e.g. ``output``).

        Raises
        ------
        VirnucError
            With the reason and the fix: a missing or read-only folder; a web server's URL,
            a bucket that does not exist or cannot be reached.
        """
