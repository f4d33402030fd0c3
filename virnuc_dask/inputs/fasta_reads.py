"""FASTA of reads: records of a header line and any number of base lines, parsed with numpy.

The rules are the protein FASTA's (``docs/input.md``) where they apply: the id is the first
word of the header; base lines may be wrapped at any width, hold spaces and tabs (ignored) and
end in LF or CRLF; blank lines are accepted anywhere; an empty record and data before the
first header are errors; a carriage return alone (classic Mac line breaks) is refused. The
letters themselves are checked when the reads are translated (a letter that is not a base or
an IUPAC code is refused with its line and position).
"""

from __future__ import annotations

import numpy as np

from virnuc_dask.errors import VirnucError
from virnuc_dask.inputs.duplicates import shown_id
from virnuc_dask.inputs.reads import ReadBatch, header_ids, offsets, split_lines


def has_boundary(block: bytes) -> bool:
    """Whether a block may end a record: it holds the start of a header."""
    return b"\n>" in block


def parse(data: bytes, line: int, final: bool, text: str) -> tuple[ReadBatch | None, int, int]:
    """Parse the whole records at the start of ``data``.

    Parameters
    ----------
    data
        Bytes of the file from the start of a line (line ``line``), at the start of a record
        or, at the start of the file, of blank lines before the first record.
    line
        The 1-based line number of ``data``'s first line.
    final
        Whether ``data`` runs to the end of the file.
    text
        The file as messages name it.

    Returns
    -------
    batch, used, lines
        The reads (None if none), the bytes and the lines of ``data`` they took.
    """
    a, starts, ends = split_lines(data, final)
    nonempty = ends > starts
    is_header = nonempty & (a[np.minimum(starts, max(len(a) - 1, 0))] == 62)
    headers = np.flatnonzero(is_header)
    taken = len(ends) if final else (int(headers[-1]) if len(headers) else 0)
    records = headers[headers < taken] if not final else headers
    if not len(records):
        if final:
            _no_record(a, starts, ends, line, text)
        return None, 0, 0
    _check_before_first(a, starts, ends, int(records[0]), line, text)
    region = (int(starts[records[0]]), int(starts[taken]) if taken < len(ends) else len(a))
    # Bytes of header lines (their line end included) are dropped, and so is whitespace.
    span = np.diff(np.append(starts[records[0] : taken], region[1]))
    in_header = np.repeat(is_header[records[0] : taken], span)
    chunk = a[region[0] : region[1]]
    _check_line_ends(a, chunk, in_header, region[0], ends, line, text)
    keep = ~in_header & (chunk > 32)
    seq = chunk[keep]
    # Bases per record: the kept bytes from its header to the next header.
    record_at = starts[records] - region[0]
    length = np.add.reduceat(keep.view(np.uint8), record_at, dtype=np.int64)
    header_end = ends[records] - (a[np.maximum(ends[records] - 1, 0)] == 13)
    lines = line + records.astype(np.int64)
    empty = np.flatnonzero(length == 0)
    if len(empty):
        row = int(empty[0])
        words = a[starts[records[row]] + 1 : header_end[row]].tobytes().split()
        name = shown_id(words[0].decode("utf-8", "replace")) if words else "(no id)"
        raise VirnucError(
            f"{text}, line {lines[row]}: read {name} is empty (no bases after its header); "
            "remove the record or add its bases"
        )
    ids, id_offsets, id_text = header_ids(a, starts[records], header_end, lines, text)

    def base_line(read: int, position: int) -> int:
        # Only for messages: walk the read's lines until the base.
        first = int(records[read]) + 1
        last = int(records[read + 1]) if read + 1 < len(records) else taken
        seen = 0
        for number in range(first, last):
            here = a[starts[number] : ends[number]]
            seen += int(np.count_nonzero(here > 32))
            if seen > position:
                return line + number
        return line + last - 1

    batch = ReadBatch(seq, offsets(length)[:-1], length, ids, id_offsets, lines, id_text, base_line)
    return batch, region[1], taken


def _check_before_first(a, starts, ends, first: int, line: int, text: str) -> None:
    """Only blank lines may come before the first header."""
    for number in range(first):
        if a[starts[number] : ends[number]].tobytes().strip():
            raise VirnucError(
                f"{text}, line {line + number}: sequence data before the first '>' header; is "
                "this a FASTA file?"
            )


def _check_line_ends(a, chunk, in_header, origin: int, ends, line: int, text: str) -> None:
    """Refuse a carriage return that does not end a line, and control characters in bases."""
    crs = np.flatnonzero(chunk == 13) + origin
    lone = crs[(crs + 1 >= len(a)) | (a[np.minimum(crs + 1, len(a) - 1)] != 10)]
    if len(lone):
        number = line + int(np.searchsorted(ends, lone[0]))
        raise VirnucError(
            f"{text}, line {number}: a carriage return (CR) inside the line: the file uses "
            "classic Mac line breaks; convert them to LF (tr '\\r' '\\n' < FILE > NEW)"
        )
    odd = ((chunk < 9) | ((chunk > 13) & (chunk < 32))) & ~in_header
    if odd.any():
        at = int(np.argmax(odd)) + origin
        number = line + int(np.searchsorted(ends, at))
        raise VirnucError(
            f"{text}, line {number}: the control character {int(a[at]):#04x}; remove it"
        )


def _no_record(a, starts, ends, line: int, text: str) -> None:
    for number in range(len(ends)):
        if a[starts[number] : ends[number]].tobytes().strip():
            raise VirnucError(
                f"{text}, line {line + number}: sequence data before the first '>' header; is "
                "this a FASTA file?"
            )
