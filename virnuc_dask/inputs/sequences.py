"""Reading sequences back from the index: what each chunk task does on its worker.

:func:`read_sequences` reads the sequences of given rows by their byte offsets (local files by
seeks, inputs at URLs by merged byte ranges), joins their lines, applies the index's
translation table (upper case, ``X`` for invalid letters when asked) and checks each one
against the length and checksum the scan recorded: a file changed since it was indexed is
refused, naming the sequence.
"""

from __future__ import annotations

import zlib

import numpy as np

from virnuc_dask.errors import VirnucError
from virnuc_dask.inputs.duplicates import shown_id as _shown_id
from virnuc_dask.inputs.fasta import _TO_UPPER, _TO_X, _WHITESPACE, FastaIndex
from virnuc_dask.inputs.staging import shown as _shown
from virnuc_dask.storage.remote import place
from virnuc_dask.storage.urls import StorageOptions


def read_sequences(
    index: FastaIndex, rows: np.ndarray, storage: StorageOptions | None = None
) -> list[bytes]:
    """Read the sequences of ``rows`` back from their files, upper-cased, ready to tokenise.

    Reads each file in offset order (one ``seek`` and ``read`` per sequence; for a URL, byte
    ranges fetched together: :meth:`~virnuc_dask.storage.places.Place.read_ranges`) and
    returns the sequences in the order of ``rows``.

    Parameters
    ----------
    index
        The inputs' index.
    rows
        The rows to read.
    storage
        fsspec options for files that are URLs.

    Raises
    ------
    VirnucError
        If a sequence's bytes differ from those indexed (its checksum): the input changed.
    """
    rows = np.asarray(rows, dtype=np.int64)
    out: list[bytes] = [b""] * len(rows)
    files = index.file[rows]
    for number in np.unique(files).tolist():
        positions = np.flatnonzero(files == number)
        starts = index.offset[rows[positions]].astype(np.int64)
        in_order = np.argsort(starts, kind="stable")  # checked in the file's order
        positions, starts = positions[in_order], starts[in_order]
        ends = starts + index.span[rows[positions]]
        where = place(index.files[number], storage)
        found = where.read_ranges(starts.tolist(), ends.tolist())
        for position, data in zip(positions.tolist(), found, strict=True):
            row = int(rows[position])
            if zlib.crc32(data) != index.checksum[row]:
                raise VirnucError(_changed(index, number, row))
            data = data.translate(None, _WHITESPACE)
            if data.endswith(b"*"):
                data = data[:-1]
            if index.invalid_to_x:
                data = data.translate(_TO_X)
            out[position] = data.translate(_TO_UPPER)
    return out


def _changed(index: FastaIndex, number: int, row: int) -> str:
    """The message for a sequence whose bytes are no longer those indexed."""
    given, read = index.inputs[number], index.files[number]
    if given == read or place(given).resolve() == place(read):
        what = _shown(given)
    else:  # gzip inputs and pipes are read from a copy in the work directory
        what = f"the staged copy {_shown(read)} of input {_shown(given)}"
    return (
        f"{what} changed since it was indexed: sequence {_shown_id(index.id(row))} no longer "
        "holds the bytes it held; inputs must not change during a run: run again once the "
        "input is final"
    )
