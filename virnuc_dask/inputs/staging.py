"""Staging: check the input paths, recognise their compression, and make them readable.

Every input is checked to exist (and to be a file or a pipe) before the first one is read, and
no file may be given twice. Protein FASTA inputs must be seekable, because workers read each
sequence back by its byte offset: gzip inputs and pipes are decompressed or copied once into
the staging directory (:func:`plain_copy`). Reads inputs are read once, front to back, so they
are streamed instead (:func:`open_blocks`): nothing of them is copied.

Decisions:

- Compression is recognised by the first bytes, not the file name. gzip (multi-member, as
  bgzip writes, included) is decompressed; bzip2, xz, zstd, zip and UTF-16 are refused by name,
  with the command that converts them.
- Damaged gzip is an error: a truncated file, bytes after the gzip data that are not gzip, a
  CRC mismatch, corrupt deflate data. Zero padding after the data is accepted (as ``gzip``
  does).
- Messages show a path quoted when it holds characters that would break the one-line message.
- ``-`` is standard input: always staged (a pipe is read once; a redirected file has no name
  that a worker could open), and refused when it is a terminal.
- An fsspec URL (:mod:`~virnuc_dask.storage`) is checked to exist before the first input is
  read, and read once, front to back. A plain one is not copied: workers read their sequences
  from the same URL by byte range. A gzip one is decompressed into the staging directory, as
  a local gzip file is. The same URL given twice is refused.
- Files and URLs are opened and read alike, through their
  :class:`~virnuc_dask.storage.places.Place`: a URL's stream can seek (by byte ranges), so
  "can a worker read it where it is" is "can its stream seek" for both; only a pipe and
  standard input cannot. Checking that an input exists, and the messages for one that cannot
  be read, stay apart: a local file's ``errno`` and a store's credentials need different fixes.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import queue
import stat
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from virnuc_dask.errors import VirnucError, option
from virnuc_dask.storage.remote import place
from virnuc_dask.storage.urls import STDIN, StorageOptions, filesystem, is_url

_GZIP_MAGIC = b"\x1f\x8b"
# First bytes of what is often mistaken for a FASTA file; none can start a FASTA file.
_OTHER_FORMATS = {
    b"BZh": ("bzip2-compressed", "decompress it first (bunzip2 -k FILE) or re-compress with gzip"),
    b"\xfd7zXZ\x00": (
        "xz-compressed",
        "decompress it first (xz -dk FILE) or re-compress with gzip",
    ),
    b"\x28\xb5\x2f\xfd": (
        "zstd-compressed",
        "decompress it first (zstd -d FILE) or re-compress with gzip",
    ),
    b"PK\x03\x04": ("a zip archive", "extract the FASTA files from it (unzip FILE)"),
    b"\xff\xfe": ("UTF-16 text", "save it as ASCII or UTF-8 text"),
    b"\xfe\xff": ("UTF-16 text", "save it as ASCII or UTF-8 text"),
}
_MAGIC_BYTES = max(len(m) for m in _OTHER_FORMATS)
#: Bytes read at a time when copying or streaming an input.
BLOCK_BYTES = 1 << 22


def shown(path: str | Path) -> str:
    """A path as a message shows it: quoted when it holds characters that would break the line."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def stat_input(path: str, storage: StorageOptions | None = None) -> os.stat_result | None:
    """Return ``os.stat`` of an input; refuse what is neither a file nor a pipe.

    For standard input (``-``) the stat of its descriptor; for a URL None, once the URL is
    known to hold a file.
    """
    if path == STDIN:
        try:
            info = os.fstat(0)
        except OSError as error:
            raise VirnucError(f"cannot read standard input: {error.strerror}") from None
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
            raise VirnucError(
                "input - (standard input) is a terminal or a device; pipe or redirect a file "
                "into it (zcat a.fa.gz | virnuc-dask embed - ...)"
            )
        return info
    if is_url(path):
        _check_url(path, storage)
        return None
    try:
        info = os.stat(path)
    except OSError as error:
        raise VirnucError(unreadable(path, error)) from None
    if stat.S_ISDIR(info.st_mode):
        raise VirnucError(
            f"input {shown(path)} is a directory; give the FASTA files inside it "
            f"({shown(os.path.join(path, '*.fasta'))})"
        )
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
        # A terminal (stdin not redirected) would wait for typing; /dev/zero would never end.
        raise VirnucError(
            f"input {shown(path)} is a device or socket, not a file or a pipe; give a FASTA "
            "file (or redirect standard input from one)"
        )
    return info


def _check_url(url: str, storage: StorageOptions | None) -> None:
    """Refuse a URL that holds no file, naming it."""
    fs, path = filesystem(url, storage)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise VirnucError(f"input {shown(url)} does not exist; check the URL") from None
    except PermissionError:
        raise VirnucError(
            f"cannot read input {shown(url)}: permission denied; check the credentials "
            "(the environment, a profile, or storage options)"
        ) from None
    except Exception as error:  # noqa: BLE001 (the store's client: credentials, network)
        raise VirnucError(
            f"cannot read input {shown(url)}: {type(error).__name__}: {error}"
        ) from None
    if info.get("type") == "directory":
        raise VirnucError(
            f"input {shown(url)} is a folder; give the FASTA files inside it "
            f"({shown(url.rstrip('/') + '/NAME.fasta')})"
        )


def check_inputs(
    inputs: list[str | Path], storage: StorageOptions | None = None
) -> tuple[list[str], list[os.stat_result | None]]:
    """Check every input before the first is read; return the paths as strings and their stats.

    A URL's stat is None; standard input (``-``) has its descriptor's.

    Raises
    ------
    VirnucError
        No input, an input that is missing, unreadable, a directory or a device, or a file
        given twice.
    """
    if not inputs:
        raise VirnucError("no input files given")
    paths = [str(p) for p in inputs]
    infos = [stat_input(path, storage) for path in paths]
    check_distinct(paths, infos)
    return paths, infos


def check_distinct(paths: list[str], infos: list[os.stat_result | None]) -> None:
    """Refuse a file given twice (under one name or two): every sequence would be seen twice."""
    first: dict[object, int] = {}
    for number, (path, info) in enumerate(zip(paths, infos, strict=True)):
        if info is None or path == STDIN:  # a URL, or standard input: by name
            key: object = path
        elif stat.S_ISREG(info.st_mode):
            key = (info.st_dev, info.st_ino)
        else:
            continue
        earlier = first.setdefault(key, number)
        if earlier != number:
            raise VirnucError(
                f"input {shown(paths[number])} is the same file as input "
                f"{shown(paths[earlier])}; give each file once"
            )


def unreadable(path: str, error: OSError) -> str:
    """The message for an input that cannot be opened or read."""
    text = shown(path)
    if is_url(path):
        if isinstance(error, FileNotFoundError):
            return f"input {text} does not exist; check the URL"
        return f"cannot read input {text}: {error.strerror or error}"
    if error.errno == errno.ENOENT:
        if os.path.islink(path):
            return (
                f"input {text} is a broken symbolic link (to {shown(os.readlink(path))}); "
                "fix the link or give the file itself"
            )
        return f"input {text} does not exist; check the path"
    if error.errno == errno.ELOOP:
        return f"input {text} is a symbolic link loop; fix the link or give the file itself"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"cannot read input {text}: permission denied; make it readable (chmod a+r)"
    return f"cannot read input {text}: {error.strerror or error}"


def _sniff(path: str, handle: BinaryIO) -> tuple[bytes, bool]:
    """Read the first bytes; refuse formats we do not read; say whether it is gzip."""
    try:
        magic = handle.read(_MAGIC_BYTES)
    except OSError as error:
        raise VirnucError(unreadable(path, error)) from None
    for prefix, (kind, fix) in _OTHER_FORMATS.items():
        if magic.startswith(prefix):
            raise VirnucError(f"input {shown(path)} is {kind}, not FASTA; {fix}")
    return magic, magic.startswith(_GZIP_MAGIC)


def plain_copy(
    path: str,
    info: os.stat_result | None,
    number: int,
    staging: str | Path | None,
    storage: StorageOptions | None = None,
) -> str:
    """Return a path to a plain, seekable version of ``path``: itself, or a staged copy.

    gzip inputs are decompressed once into ``staging``; so are pipes and standard input, which
    can be read only once. Other compressed formats are refused with the command that
    decompresses them. A plain URL is returned as it is: workers read it by byte range.
    ``info`` is the input's :func:`stat_input` (None for a URL); whether the input can be
    read where it is, its stream says (see the module's docstring).
    """
    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(_open_input(path, storage))
        magic, compressed = _sniff(path, handle)
        seekable = path != STDIN and handle.seekable()
        if seekable and not compressed:
            return str(place(path).resolve())
        if staging is None:
            what = "gzip-compressed" if compressed else "not a regular file (a pipe?)"
            raise VirnucError(
                f"input {shown(path)} is {what}; a staging directory is needed to index it"
            )
        if seekable:
            handle.seek(0)
            source: BinaryIO = handle
        else:
            source = _Prefixed(magic, handle)
        name = "stdin" if path == STDIN else Path(path.rstrip("/")).name
        if compressed:
            source = gzip.GzipFile(fileobj=source, mode="rb")
            name = name.removesuffix(".gz")
        target = Path(staging) / f"input-{number:04d}-{name}"
        _copy(source, target, path)
    return str(target.resolve())


def _open_input(path: str, storage: StorageOptions | None) -> BinaryIO:
    """Open an input for reading: a file, standard input (``-``) or a URL."""
    try:
        if path == STDIN:
            return open(0, "rb", closefd=False)  # noqa: SIM115 (the caller closes it)
        return place(path, storage).open_read(BLOCK_BYTES)
    except OSError as error:
        raise VirnucError(unreadable(path, error)) from None


@contextlib.contextmanager
def open_blocks(path: str, digest=None, storage: StorageOptions | None = None) -> Iterator[Blocks]:
    """Open an input to be read once, front to back, decompressing gzip on the fly.

    Works for pipes, standard input (``-``) and URLs too (nothing is copied). Yields a
    :class:`Blocks` reader.

    Parameters
    ----------
    path
        The input.
    digest
        A ``hashlib`` object updated with the file's bytes as stored (compressed, for gzip:
        fewer bytes to hash, and as good an identity of the input).
    storage
        fsspec options, for a URL.
    """
    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(_open_input(path, storage))
        seekable = handle.seekable()
        magic, compressed = _sniff(path, handle)
        if seekable:
            handle.seek(0)
            source: BinaryIO = _Hashed(b"", handle, digest)
        else:
            source = _Hashed(magic, handle, digest)
        if compressed:
            source = stack.enter_context(gzip.GzipFile(fileobj=source, mode="rb"))
        blocks = Blocks(source, path, compressed)
        stack.callback(blocks.close)
        yield blocks


class Blocks:
    """Successive blocks of an input's (decompressed) bytes; errors say what is wrong.

    A thread reads ahead (a few blocks at most): reading, decompressing and hashing release
    the GIL, so they overlap with the parsing and translating of the blocks before.

    Parameters
    ----------
    source
        The open stream.
    path
        The input as given, for messages.
    compressed
        Whether ``source`` decompresses gzip.
    """

    _AHEAD = 3

    def __init__(self, source: BinaryIO, path: str, compressed: bool) -> None:
        self._source, self._path, self.compressed = source, path, compressed
        self._queue: queue.Queue = queue.Queue(maxsize=self._AHEAD)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_ahead, daemon=True)
        self._thread.start()

    def _read_ahead(self) -> None:
        # read1 for gzip: a gzip stream hands over everything it could decompress before it
        # raises for a truncated file, so that the message can say where the data stops. It
        # returns small pieces: they are gathered into blocks of BLOCK_BYTES.
        read = self._source.read1 if self.compressed else self._source.read
        pieces: list[bytes] = []
        size = 0
        while not self._stop.is_set():
            try:
                piece = read(BLOCK_BYTES - size)
            except BaseException as error:  # handed to the reader, which raises it
                if pieces:
                    self._put(b"".join(pieces))
                self._put(error)
                return
            pieces.append(piece)
            size += len(piece)
            if piece and size < BLOCK_BYTES:
                continue
            self._put(b"".join(pieces))
            if not piece:
                if size:
                    self._put(b"")
                return
            pieces, size = [], 0

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, where: Callable[[], str] | None = None) -> bytes:
        """The next block (empty at the end); ``where()`` places a truncation in the message."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put(item)  # every later read raises it too
            raise read_error(item, self._path, where) from None
        if not item:
            self._queue.put(item)
        return item

    def close(self) -> None:
        """Stop reading ahead (the stream is closed by :func:`open_blocks`)."""
        self._stop.set()
        self._thread.join()


class _Hashed:
    """A file's bytes (after ``prefix``, bytes already read from a pipe), hashed as read."""

    def __init__(self, prefix: bytes, stream: BinaryIO, digest) -> None:
        self._prefix, self._stream, self._digest = prefix, stream, digest

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            cut = len(self._prefix) if size is None or size < 0 else size
            data, self._prefix = self._prefix[:cut], self._prefix[cut:]
        else:
            data = self._stream.read(size)
        if self._digest is not None:
            self._digest.update(data)
        return data


class _Prefixed(io.RawIOBase):
    """Bytes already read from a pipe, then the rest of it: a pipe cannot seek back."""

    def __init__(self, prefix: bytes, stream: BinaryIO) -> None:
        self._prefix, self._stream = prefix, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._prefix[: len(buffer)] or self._stream.read(len(buffer))
        self._prefix = self._prefix[len(data) :]
        buffer[: len(data)] = data
        return len(data)


def _copy(source: BinaryIO, target: Path, path: str) -> None:
    """Copy ``source`` to ``target`` atomically; errors become messages that say the fix."""
    partial = target.with_name(target.name + ".partial")
    cannot_write = f"cannot write {shown(partial)} to stage input {shown(path)}"
    try:
        with contextlib.ExitStack() as stack:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                out = stack.enter_context(open(partial, "wb"))
            except OSError as error:
                raise VirnucError(f"{cannot_write}: {error.strerror or error}") from None
            while block := read_block(source.read, path):
                try:
                    out.write(block)
                except OSError as error:
                    raise out_of_room(cannot_write, error) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)


def out_of_room(cannot_write: str, error: OSError) -> VirnucError:
    """A failed write into the work directory, with the fix (free space, another folder)."""
    return VirnucError(
        f"{cannot_write}: {error.strerror or error}; free space there or choose another work "
        f"directory ({option('work_dir', 'DIR')})"
    )


def read_block(read, path: str, where: Callable[[], str] | None = None) -> bytes:
    """One block from ``read``; damaged gzip data becomes a message that says the fix.

    Parameters
    ----------
    read
        The stream's ``read`` (or ``read1``) method.
    path
        The input, for messages.
    where
        Called for a truncated file: what it returns (e.g. ``", in line 12"``) is inserted
        after "ends inside its compressed data".
    """
    try:
        return read(BLOCK_BYTES)
    except (EOFError, zlib.error, OSError) as error:  # gzip.BadGzipFile is an OSError
        raise read_error(error, path, where) from None


def read_error(
    error: BaseException, path: str, where: Callable[[], str] | None = None
) -> BaseException:
    """The message for an error reading an input (damaged gzip, I/O); others unchanged."""
    text = shown(path)
    if isinstance(error, EOFError):
        return VirnucError(
            f"input {text} is a truncated gzip file (it ends inside its compressed data"
            f"{where() if where else ''}: "
            "a download or copy cut short?); fetch or compress it again"
        )
    if isinstance(error, gzip.BadGzipFile):
        if str(error).startswith("Not a gzipped file"):
            return VirnucError(
                f"input {text} has bytes after the end of its gzip data that are not gzip "
                "(trailing garbage); re-compress it (gzip -dc FILE | gzip > NEW.gz)"
            )
        return VirnucError(
            f"input {text} is a damaged gzip file ({error}); fetch or compress it again"
        )
    if isinstance(error, zlib.error):
        return VirnucError(
            f"input {text} is a damaged gzip file ({error}); fetch or compress it again"
        )
    if isinstance(error, OSError):
        return VirnucError(unreadable(path, error))
    return error
