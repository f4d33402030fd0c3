"""A local file or folder with the methods of :class:`~virnuc_dask.storage.remote.Remote`.

The twin of ``Remote`` (:mod:`~virnuc_dask.storage.places` says why there is one): the same
methods, the same meaning, done with the local filesystem's own guarantees. No local code
path goes through fsspec.

Decisions:

- **Whole writes by rename**: :meth:`Local.write_bytes` (and :meth:`Local.put`) write a
  temporary sibling and ``os.replace`` it over the file, as one PUT replaces an object:
  readers see the old bytes or the new, never a mix, and a killed writer leaves the old file.
- **Exclusive creation by ``O_EXCL``** (:meth:`Local.create`): of two processes, exactly one
  creates the file. The bytes follow in one write, so a reader may find the file empty for a
  moment; the locks read that as a run that is starting (:mod:`~virnuc_dask.storage.locks`),
  the markers as a folder that is not (yet) the tool's.
- **No versions** (:attr:`Local.versioned` is False; :meth:`Local.read_versioned` gives
  ``None``; :meth:`Local.write_if` and :meth:`Local.unlink_if` write and remove plainly), as
  on a store without them. A version made of ``(st_ino, st_mtime_ns, st_size)`` could be
  read, but POSIX has no write that holds only while the file is still that version: a check
  before the write would leave the window a version exists to close. The locks need none
  locally: a local lock is not a lease (its owner's liveness is checked by its pid), a
  takeover happens under an ``O_EXCL`` guard and replaces the lock by a rename, and a run
  that releases its lock is alive, so no takeover can land between its read and its unlink.
- **An exclusive put by hard link**: ``os.link`` creates the name only while it is free, so a
  file that appeared since a check is never replaced; where the filesystem has no hard links
  the check just made stands, as a store without conditional writes does.
- **Reading**: :meth:`Local.open_read` is a plain ``open``. Asked to hash the file, it hashes
  it first, in blocks of 16 MiB, and then opens it: two reads of the page cache, faster than
  one hashed stream (a URL's, one download), measured at 4.3 s against 4.8 s for indexing
  146 MB of FASTA. :meth:`Local.read_ranges` is one ``seek`` and ``read`` a range, in the
  file's order.
- **Sources are the path itself** (:meth:`Local.source`, :meth:`Local.local_source`): h5py
  and xarray open the file with their own drivers; nothing is copied.
- Folders exist for real: :meth:`Local.mkdir` creates them, :meth:`Local.is_dir` is a folder
  (empty or not) and :meth:`Local.rmtree` removes one with ``shutil.rmtree``.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path
from typing import BinaryIO

from virnuc_dask.errors import VirnucError
from virnuc_dask.storage.places import Place
from virnuc_dask.storage.urls import StorageOptions

#: Bytes hashed at a time by :meth:`Local.open_read`.
_HASH_BLOCK = 1 << 24

#: Why a hard link may fail other than an existing name: the filesystem has none.
NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)


class Local(Place):
    """A local file or folder, with the methods of :class:`~virnuc_dask.storage.remote.Remote`.

    ``os.fspath()`` gives its path, so it can be handed to h5py, numpy or ``open``.

    Parameters
    ----------
    path
        The local path (relative paths stay relative, as in ``pathlib``).

    Attributes
    ----------
    path
        The ``pathlib.Path``, for the local fast paths (renames, hard links, memory maps).
    storage
        Empty fsspec options: none apply to a local path (``Remote`` has the URL's).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.storage = StorageOptions()

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Local({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def _key(self) -> Path:
        return self.path

    def __truediv__(self, name: str) -> Local:
        return Local(self.path / name)

    @property
    def name(self) -> str:
        """The last part of the path."""
        return self.path.name

    @property
    def parent(self) -> Local:
        """The folder one level up."""
        return Local(self.path.parent)

    def contains(self, other: Place) -> bool:
        """Whether ``other`` is this path or lies under it (a URL never does)."""
        if type(other) is not Local:
            return False
        return other.path == self.path or self.path in other.path.parents

    @property
    def native(self) -> Path:
        """The ``Path``, as the package hands a local place out."""
        return self.path

    def absolute(self) -> Local:
        """The absolute path, ``~`` expanded, links left as they are."""
        return Local(os.path.abspath(self.path.expanduser()))

    def resolve(self) -> Local:
        """The absolute path with every symbolic link resolved."""
        return Local(os.path.realpath(self.path.expanduser()))

    def exists(self) -> bool:
        """Whether a file or folder is here (following a link)."""
        return self.path.exists()

    def is_file(self) -> bool:
        """Whether a regular file is here."""
        return self.path.is_file()

    def is_dir(self) -> bool:
        """Whether a folder is here."""
        return self.path.is_dir()

    def is_symlink(self) -> bool:
        """Whether this is a symbolic link."""
        return self.path.is_symlink()

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Create the folder (``FileExistsError`` when it exists, unless ``exist_ok``)."""
        self.path.mkdir(parents=parents, exist_ok=exist_ok)

    def read_bytes(self) -> bytes:
        """The file's bytes (``FileNotFoundError`` when there is none)."""
        return self.path.read_bytes()

    def _temporary(self) -> Path:
        # One name per process and thread: two writers of one file never share a temporary.
        return self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file by a rename: readers see the old bytes or the new."""
        tmp = self._temporary()
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def create(self, data: bytes) -> bool:
        """Create the file with ``O_EXCL``; say whether this call created it."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    @property
    def versioned(self) -> bool:
        """Never: local files have no versions (see the module's decisions)."""
        return False

    def read_versioned(self) -> tuple[bytes, None]:
        """The file's bytes, and ``None`` for their version."""
        return self.read_bytes(), None

    def write_if(self, data: bytes, version: str | None) -> None:
        """Write the whole file, whatever ``version`` says (no versions here)."""
        self.write_bytes(data)

    def unlink_if(self, version: str | None) -> None:
        """Remove the file, whatever ``version`` says (no versions here)."""
        self.unlink(missing_ok=True)

    def put(self, local: str | os.PathLike, *, exclusive: bool = False) -> None:
        """Copy a local file here, whole (by a rename, or a hard link with ``exclusive``).

        With ``exclusive`` the copy fails (``FileExistsError``) if a file is here.
        """
        tmp = self._temporary()
        try:
            shutil.copyfile(local, tmp)
            if exclusive:
                try:
                    os.link(tmp, self.path)
                except OSError as error:
                    if isinstance(error, FileExistsError) or error.errno not in NO_HARD_LINKS:
                        raise
                    if self.path.exists():
                        raise FileExistsError(str(self.path)) from None
                else:
                    tmp.unlink()
                    return
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, local: str | os.PathLike) -> None:
        """Copy the file to a local file."""
        shutil.copyfile(self.path, local)

    def open_read(self, block_size: int = 1 << 22, digest=None) -> BinaryIO:
        """The file opened for reading: a plain ``open``, ``digest`` updated with it first.

        ``digest`` (a ``hashlib`` object), when given, holds every byte of the file once this
        returns: hashed in large blocks before, not in the stream (see the module's docstring).
        """
        if digest is not None:
            with open(self.path, "rb") as f:
                while block := f.read(_HASH_BLOCK):
                    digest.update(block)
        return open(self.path, "rb")  # noqa: SIM115 (the caller closes it)

    def read_ranges(self, starts: list[int], ends: list[int]) -> list[bytes]:
        """The bytes of each range, read with one ``seek`` each, in the file's order."""
        out = [b""] * len(starts)
        with open(self.path, "rb") as f:
            for i in sorted(range(len(starts)), key=starts.__getitem__):
                f.seek(starts[i])
                out[i] = f.read(ends[i] - starts[i])
        return out

    def source(self) -> str:
        """The path itself: readers open it with their own drivers."""
        return str(self.path)

    def local_source(self) -> str:
        """The path itself: it is local already."""
        return str(self.path)

    def unlink(self, missing_ok: bool = False) -> None:
        """Remove the file."""
        self.path.unlink(missing_ok=missing_ok)

    def glob(self, pattern: str) -> list[Local]:
        """The entries of this folder whose names match ``pattern`` (one level), sorted."""
        return sorted(Local(p) for p in self.path.glob(pattern))

    def files(self) -> list[str]:
        """Every file under this folder, as paths relative to it."""
        found = (p for p in self.path.rglob("*") if p.is_file())
        return sorted(p.relative_to(self.path).as_posix() for p in found)

    def rmtree(self) -> None:
        """Remove the folder and everything in it."""
        if self.path.exists():
            shutil.rmtree(self.path)

    def modified(self) -> float:
        """When the file was last written, in seconds since the epoch (this host's clock)."""
        return self.path.stat().st_mtime

    def samefile(self, other: Place) -> bool:
        """Whether ``other`` is this file, under any name (both must exist)."""
        if type(other) is not Local:
            return False
        try:
            return os.path.samefile(self.path, other.path)
        except OSError:
            return False

    def check_writable(self, what: str) -> None:
        """Refuse a path whose folder is missing or not writable, naming it as ``what``."""
        folder = self.path.parent
        if not folder.is_dir():
            raise VirnucError(f"{what} folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise VirnucError(f"{what} folder {folder} is not writable")
