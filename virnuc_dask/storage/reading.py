"""Reading parts of remote files: merged byte ranges, and whole files through one stream.

Workers read their sequences from inputs at URLs by byte range; ranges closer than
:data:`MERGE_GAP` are read in one request, up to :data:`MERGE_BLOCK` bytes.

A stream (:func:`buffered`, under :func:`open_url` and under a local file opened with a
digest) splits lines in C and hashes every byte read on the way. It seeks where its file can,
unless it hashes: a seek would hash bytes twice, or skip some.
"""

from __future__ import annotations

import bisect
import io
import logging

from virnuc_dask.storage.urls import StorageOptions, filesystem

logger = logging.getLogger(__name__)


#: Byte ranges closer than this are read in one request (workers reading their sequences).
MERGE_GAP = 1 << 16


#: The largest merged request.
MERGE_BLOCK = 1 << 26


def read_ranges(url: str, starts: list[int], ends: list[int], storage: StorageOptions | None):
    """The bytes ``[start, end)`` of ``url`` for each pair, in the order given.

    Ranges closer than :data:`MERGE_GAP` are read in one request, and the requests go out
    concurrently (fsspec's ``cat_ranges``): a chunk's sequences lie all over a large file, so
    reading each through a buffered file would fetch a whole block per sequence.
    """
    from fsspec.utils import merge_offset_ranges

    if not starts:
        return []
    fs, path = filesystem(url, storage)
    order = sorted(range(len(starts)), key=starts.__getitem__)
    sorted_starts = [starts[i] for i in order]
    sorted_ends = [ends[i] for i in order]
    _, block_starts, block_ends = merge_offset_ranges(
        [path] * len(order),
        list(sorted_starts),
        list(sorted_ends),
        max_gap=MERGE_GAP,
        max_block=MERGE_BLOCK,
        sort=False,
    )
    blocks = fs.cat_ranges([path] * len(block_starts), block_starts, block_ends)
    out: list[bytes] = [b""] * len(starts)
    for i, start, end in zip(order, sorted_starts, sorted_ends, strict=True):
        b = bisect.bisect_right(block_starts, start) - 1
        base = block_starts[b]
        out[i] = bytes(blocks[b][start - base : end - base])
    return out


def open_url(
    url: str, storage: StorageOptions | None, block_size: int = 1 << 22, digest=None
) -> io.BufferedReader:
    """Open ``url`` for reading front to back, buffered (``io.BufferedReader``).

    ``digest`` (a ``hashlib`` object), when given, is updated with every byte read.

    Raises
    ------
    FileNotFoundError
        Nothing at the URL.
    """
    fs, path = filesystem(url, storage)
    # Read ahead whole blocks: the file is read once, in order.
    raw = fs.open(path, "rb", block_size=block_size, cache_type="readahead")
    return buffered(raw, block_size, digest)


def buffered(handle, block_size: int = 1 << 22, digest=None) -> io.BufferedReader:
    """``handle`` (an fsspec or unbuffered local file) as a buffered stream, hashed if asked.

    ``digest`` (a ``hashlib`` object), when given, is updated with every byte read; the
    stream then cannot seek (see the module's docstring).
    """
    return io.BufferedReader(_Raw(handle, digest), buffer_size=block_size)


class _Raw(io.RawIOBase):
    """A file as a raw stream, so that ``io.BufferedReader`` splits lines in C."""

    def __init__(self, handle, digest=None) -> None:
        self._handle, self._digest = handle, digest

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._digest is None and self._handle.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if not self.seekable():
            raise io.UnsupportedOperation("seek")
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def readinto(self, buffer) -> int:
        # Straight into the buffer (local files and fsspec files both can): no copy.
        count = self._handle.readinto(buffer) or 0
        if self._digest is not None:
            self._digest.update(memoryview(buffer)[:count])
        return count

    def close(self) -> None:
        self._handle.close()
        super().close()
