"""A file or folder at an fsspec URL, with the few ``pathlib`` methods the tool uses.

Its local twin is :class:`~virnuc_dask.storage.local.Local` (the same methods:
:class:`~virnuc_dask.storage.places.Place`), and :func:`place` the one factory of both: a
``Remote`` for a URL (:func:`~virnuc_dask.storage.urls.is_url`), a ``Local`` for anything else.

Decisions:

- **One PUT is atomic** on object stores: an object appears whole or not at all. Files that
  must never be seen half-written (shards, the HDF5 output, staged inputs, the manifest) are
  written locally and put in one call (:meth:`Remote.put`, :meth:`Remote.write_bytes`).
- **Exclusive creation** (:meth:`Remote.create`) uses the store's conditional write (S3's
  ``If-None-Match: *``, through fsspec's ``mode="create"``). Where the store or its fsspec
  driver has none, it checks, writes and reads back, and says so once in the log: the locks'
  lease (:mod:`~virnuc_dask.storage.locks`) then bounds what the race can cost.
- **Versions and compare-and-swap** (:meth:`Remote.read_versioned`, :meth:`Remote.write_if`,
  :meth:`Remote.unlink_if`): on S3 an object's version is its ETag, returned with the bytes by
  one GET and by every PUT, and a PUT or DELETE with ``If-Match`` succeeds only while the
  object is still that version (else :class:`VersionChanged`). They go through s3fs's
  ``call_s3`` (its ``pipe_file`` and ``rm_file`` take no ``If-Match``), so the storage
  options' extra request arguments apply as to every other call. Other stores give no
  version (``None``) and the writes are plain ones: GCS has the same condition
  (``ifGenerationMatch``) but the test suite has no GCS server to prove it against, so it
  keeps the plain writes until one is added. A store that takes the header but ignores it
  (some S3-compatible servers) cannot be told from here: the locks read the owner first and
  bound what that costs with their lease.
- **Sources** (:meth:`Remote.source`, :meth:`Remote.local_source`): a file read in place is
  an fsspec file (HDF5 reads it by byte ranges); one read again and again (a shard copied
  into the output) is downloaded once into an unnamed temporary file, not into memory.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from virnuc_dask.errors import VirnucError
from virnuc_dask.storage.local import Local
from virnuc_dask.storage.places import Place, VersionChanged
from virnuc_dask.storage.reading import open_url, read_ranges
from virnuc_dask.storage.urls import StorageOptions, filesystem, is_url, local_path

__all__ = [
    "Place",
    "Remote",
    "VersionChanged",
    "download_folder",
    "load_npy",
    "place",
    "save_npy",
    "upload_folder",
    "write_atomic",
]

logger = logging.getLogger(__name__)


#: Protocols whose objects have versions for compare-and-swap (see the decisions).
_VERSIONED = ("s3", "s3a")


#: S3's answers to a request whose condition does not hold (409: a concurrent conditional write).
_CONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _condition_failed(error: OSError) -> bool:
    """Whether s3fs's ``error`` is S3 refusing a request whose condition does not hold."""
    response = getattr(error.__cause__, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code in _CONDITION_FAILED or status in _CONDITION_FAILED


async def _get_s3(fs, bucket: str, key: str) -> tuple[bytes, str]:
    """The bytes of an S3 object and the ETag of those very bytes, in one GET."""
    out = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    try:
        return await out["Body"].read(), out["ETag"]
    finally:
        out["Body"].close()


class Remote(Place):
    """A file or folder at an fsspec URL, with the few ``pathlib`` methods the tool uses.

    Object stores have no folders: a folder is a prefix, which exists when an object lies
    under it; :meth:`mkdir` does nothing.

    Parameters
    ----------
    url
        The URL (``s3://bucket/run/out.h5.work``).
    storage
        fsspec options for it.
    """

    def __init__(self, url: str, storage: StorageOptions | None = None, _fs=None) -> None:
        self.url = url.rstrip("/")
        self.storage = storage or StorageOptions()
        if _fs is None:
            self.fs, self.path = filesystem(self.url, self.storage)
        else:
            self.fs, self.path = _fs, _fs._strip_protocol(self.url)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    def _key(self) -> str:
        return self.url

    def __truediv__(self, name: str) -> Remote:
        return Remote(f"{self.url}/{name}", self.storage, _fs=self.fs)

    @property
    def name(self) -> str:
        """The last part of the URL."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Remote:
        """The URL one level up."""
        return Remote(self.url.rsplit("/", 1)[0], self.storage, _fs=self.fs)

    def contains(self, other: Place) -> bool:
        """Whether ``other`` is this URL or lies under it (a local path never does)."""
        if type(other) is not type(self):
            return False
        return other.url == self.url or other.url.startswith(self.url + "/")

    @property
    def native(self) -> Remote:
        """Itself: the package hands a URL out as a ``Remote``."""
        return self

    def absolute(self) -> Remote:
        """Itself: a URL is absolute."""
        return self

    def resolve(self) -> Remote:
        """Itself: a URL has no symbolic links."""
        return self

    def exists(self) -> bool:
        """Whether an object is at this URL or under it."""
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        """Whether an object is at this URL."""
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        """Whether objects lie under this URL."""
        return bool(self.fs.isdir(self.path))

    def is_symlink(self) -> bool:
        """Object stores have no links."""
        return False

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing: a prefix exists once an object is written under it."""

    def read_bytes(self) -> bytes:
        """The object's bytes (``FileNotFoundError`` when there is none)."""
        return self.fs.cat_file(self.path)

    def write_bytes(self, data: bytes) -> None:
        """Write the object in one PUT: readers see the old bytes or the new, never a mix."""
        self.fs.pipe_file(self.path, data)

    def create(self, data: bytes) -> bool:
        """Create the object only if there is none; say whether this call created it.

        A conditional write where the store has one; else check, write and read back (see the
        module's decisions).
        """
        try:
            self.fs.pipe_file(self.path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, ValueError):
            pass
        logger.warning(
            "%s: the store offers no conditional write; creating %s by check and write "
            "(the lock's lease guards the race)",
            self.fs.protocol,
            self.url,
        )
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, data)
        return self.read_bytes() == data

    @property
    def versioned(self) -> bool:
        """Whether the store gives versions for compare-and-swap (see the module's decisions)."""
        protocols = self.fs.protocol
        protocols = (protocols,) if isinstance(protocols, str) else protocols
        return any(protocol in _VERSIONED for protocol in protocols)

    def read_versioned(self) -> tuple[bytes, str | None]:
        """The object's bytes and their version (``None`` where the store gives none).

        Raises
        ------
        FileNotFoundError
            There is no object.
        """
        if not self.versioned:
            return self.read_bytes(), None
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.path)
        return sync(self.fs.loop, _get_s3, self.fs, bucket, key)

    def write_if(self, data: bytes, version: str | None) -> str | None:
        """Write the object in one PUT only if it is still ``version``; return the new version.

        With ``version`` ``None``, or on a store without versions, the write is a plain one
        (and ``None`` is returned).

        Raises
        ------
        VersionChanged
            The object is another version now, or is gone; nothing was written.
        """
        if version is None or not self.versioned:
            self.write_bytes(data)
            return None
        return self._if_match("put_object", version, Body=data)["ETag"]

    def unlink_if(self, version: str | None) -> None:
        """Remove the object only if it is still ``version``.

        With ``version`` ``None``, or on a store without versions, the delete is a plain one.

        Raises
        ------
        VersionChanged
            The object is another version now, or is gone; nothing was removed.
        """
        if version is None or not self.versioned:
            self.unlink(missing_ok=True)
            return
        self._if_match("delete_object", version)

    def _if_match(self, call: str, version: str, **arguments) -> dict:
        """S3's ``call`` on this object, conditional on its ETag being ``version``."""
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            return self.fs.call_s3(call, Bucket=bucket, Key=key, IfMatch=version, **arguments)
        except FileNotFoundError:
            raise VersionChanged(f"{self.url} is gone") from None
        except OSError as error:
            if _condition_failed(error):
                raise VersionChanged(f"{self.url} is no longer version {version}") from None
            raise
        finally:
            self.fs.invalidate_cache(self.path)

    def put(self, local: str | os.PathLike, *, exclusive: bool = False) -> None:
        """Upload a local file in one call (one object, atomic on object stores).

        With ``exclusive`` the upload fails (``FileExistsError``) if an object is there.
        """
        if exclusive:
            try:
                self.fs.put_file(str(local), self.path, mode="create")
                return
            except (TypeError, NotImplementedError):
                if self.fs.exists(self.path):
                    raise FileExistsError(self.url) from None
        self.fs.put_file(str(local), self.path)

    def get(self, local: str | os.PathLike) -> None:
        """Download the object to a local file."""
        self.fs.get_file(self.path, str(local))

    def open_read(self, block_size: int = 1 << 22, digest=None) -> BinaryIO:
        """The object opened for reading front to back, whole blocks read ahead."""
        return open_url(self.url, self.storage, block_size, digest)

    def read_ranges(self, starts: list[int], ends: list[int]) -> list[bytes]:
        """The bytes of each range, nearby ones merged into one request (concurrently)."""
        return read_ranges(self.url, starts, ends, self.storage)

    def source(self) -> BinaryIO:
        """The object opened for reading by byte ranges (an fsspec file; the caller closes it)."""
        return self.fs.open(self.path, "rb")

    def local_source(self) -> BinaryIO:
        """A local copy of the object, in an unnamed temporary file (the caller closes it).

        Raises
        ------
        FileNotFoundError
            No object at the URL.
        """
        folder = tempfile.mkdtemp(prefix="virnuc-dask-copy-")
        try:
            local = Path(folder) / self.name
            self.get(local)
            return open(local, "rb")  # noqa: SIM115 (the caller closes it)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # an open file stays readable (POSIX)

    def unlink(self, missing_ok: bool = False) -> None:
        """Remove the object."""
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def glob(self, pattern: str) -> list[Remote]:
        """The objects under this URL whose names match ``pattern`` (one level)."""
        found = self.fs.glob(f"{self.path}/{pattern}")
        return sorted(self / p.rsplit("/", 1)[-1] for p in found)

    def files(self) -> list[str]:
        """Every object under this URL, as paths relative to it."""
        base = self.path.rstrip("/") + "/"
        return sorted(p[len(base) :] for p in self.fs.find(self.path) if p.startswith(base))

    def rmtree(self) -> None:
        """Remove every object under this URL."""
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def modified(self) -> float:
        """When the object was last written, in seconds since the epoch (store's clock)."""
        info = self.fs.info(self.path)
        # "created" last: where a store gives no other time (fsspec's memory store), an
        # object rewritten whole is created anew by each write.
        for name in ("LastModified", "mtime", "updated", "last_modified", "created"):
            value = info.get(name)
            if value is None:
                continue
            if hasattr(value, "timestamp"):
                return float(value.timestamp())
            try:
                return float(value)
            except (TypeError, ValueError):
                continue
        raise OSError(f"{self.url}: the store gives no modification time")

    def samefile(self, other: Place) -> bool:
        """Whether ``other`` is this URL (an object store has no links)."""
        return self == other

    def check_writable(self, what: str) -> None:
        """Refuse a web server's URL, or a bucket that is missing or cannot be reached."""
        protocol = self.url.split("://", 1)[0].lower()
        if protocol in ("http", "https"):
            raise VirnucError(
                f"{what} {self.url}: a web server's URL can be read, not written; give a "
                "local path or an object store's URL (s3://, gs://, abfs://)"
            )
        if protocol in ("s3", "s3a", "gs", "gcs"):
            bucket = self.path.split("/", 1)[0]
            try:
                found = self.fs.exists(bucket)
            except Exception as error:  # noqa: BLE001 (the store's client: credentials, network)
                raise VirnucError(
                    f"cannot reach {what} {self.url}: {type(error).__name__}: {error}"
                ) from None
            if not found:
                raise VirnucError(
                    f"{what} {self.url}: the bucket {bucket} does not exist; create it first"
                )


def place(text: str | os.PathLike | Place, storage: StorageOptions | None = None) -> Place:
    """A :class:`Remote` for a URL, a :class:`~virnuc_dask.storage.local.Local` for anything else.

    A place given is returned as it is. ``storage`` holds the fsspec options of a URL.
    """
    if isinstance(text, Place):
        return text
    if is_url(text):
        return Remote(str(text), storage)
    return Local(local_path(text))


def write_atomic(target: str | os.PathLike | Place, data: bytes) -> None:
    """Write a whole file that readers never see half-written (a rename, or one PUT)."""
    place(target).write_bytes(data)


def save_npy(target: str | os.PathLike | Place, array: np.ndarray) -> None:
    """``np.save``, written whole (as :func:`write_atomic`)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    place(target).write_bytes(buffer.getvalue())


def load_npy(source: str | os.PathLike | Place) -> np.ndarray:
    """``np.load``, read whole."""
    return np.load(io.BytesIO(place(source).read_bytes()))


def upload_folder(local: Path, target: Remote) -> None:
    """Upload every file under ``local`` to the same names under ``target``, one PUT each."""
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        (target / path.relative_to(local).as_posix()).put(path)


def download_folder(source: Remote, local: Path) -> None:
    """Download every object under ``source`` into ``local`` (created)."""
    for name in source.files():
        path = local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (source / name).get(path)
