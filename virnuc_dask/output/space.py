"""Disk space: a full disk or quota while writing an output becomes one clear error.

Outputs reserve their bytes before writing where they can (see :mod:`.layout`); whatever
still runs out of space (ENOSPC or EDQUOT, also as HDF5 reports it in a message) becomes
:class:`DiskFull`, which names the path and the space needed and says that the shards are
kept, so the run resumes without recomputing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from virnuc_dask.errors import VirnucError, option

_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: HDF5 reports a failed write in its message, sometimes without setting ``errno``.
_HDF5_OUT_OF_SPACE = re.compile(rf"errno = ({errno.ENOSPC}|{errno.EDQUOT})\b")


class DiskFull(VirnucError):
    """The disk (or the user's quota) ran out of space while assembling.

    Partial files are removed and the finished shards kept, so that the run can resume, without
    recomputing, once there is space.
    """


def close_half_closed(error: BaseException, path: Path) -> None:
    """Finish closing the file at ``path`` that a failed netCDF write left half-closed.

    When HDF5 fails to close a file (a full disk fails its last flush), h5netcdf does not mark
    it closed and closes it again when ``error``'s traceback is collected: h5py then reads the
    half-closed file and the process dies of a segmentation fault. The file is our partial,
    removed anyway: emptying it frees the space the last flush needs, so it closes cleanly.
    """
    h5netcdf = sys.modules.get("h5netcdf")
    if h5netcdf is None:
        return
    for frame in _frames(error):
        for value in list(frame.f_locals.values()):
            if not isinstance(value, h5netcdf.File) or value._closed is not False:
                continue
            # h5netcdf's copy of the name: h5py's own reads the half-closed file.
            if os.path.abspath(value._filename) != os.path.abspath(path):
                continue
            h5file = value._h5file
            value._closed = True
            with contextlib.suppress(OSError):
                os.truncate(path, 0)
            with contextlib.suppress(Exception):
                h5file.close()


def _frames(error: BaseException) -> Iterator:
    """Every frame of ``error``'s traceback and of the exceptions it was raised from."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next
        error = error.__cause__ or error.__context__


def _out_of_space(error: BaseException) -> bool:
    """Whether ``error``, or one it was raised from, is a lack of disk space or quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE:
            return True
        if _HDF5_OUT_OF_SPACE.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def reporting_disk_full(path: Path, what: str, needed: int) -> Iterator[None]:
    """Turn a lack of space while writing ``what`` at ``path`` into :class:`DiskFull`."""
    try:
        yield
    except DiskFull:
        raise  # named already, by an inner block for another path
    except Exception as error:
        if not _out_of_space(error):
            raise
        raise DiskFull(
            f"no space left for {what} at {path}: it needs about {_size(needed)} of free space "
            "on that disk. The partial files were removed and the finished shards are kept: "
            f"free some space and run again with {option('resume')} to assemble them without "
            "recomputing"
        ) from error


def _size(nbytes: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"
