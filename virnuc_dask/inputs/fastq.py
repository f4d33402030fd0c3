"""FASTQ: records of four lines, parsed by their place in the file, many at once with numpy.

A record is ``@id [description]``, the bases, ``+`` (optionally followed by the id again), and
one quality letter per base. Lines are counted from the start of the file, so a record's
lines are known by their number alone: a quality line that begins with ``@`` or ``+`` (both
are quality letters) is read as what it is. Consequences, as ``docs/input.md`` lists them:

- Wrapped FASTQ (bases or qualities over several lines) is refused: the third line of a record
  is then not its ``+`` line. Every sequencer writes four-line records.
- The quality line must have as many letters as the bases; its letters are not otherwise read.
- An empty read (an empty bases line and an empty quality line, as trimmers may write) is
  accepted; it has no frame to translate.
- CRLF line ends are accepted; blank lines are accepted only after the last record.
- A file that ends inside a record is refused, naming the read and the line.
"""

from __future__ import annotations

import numpy as np

from virnuc_dask.errors import VirnucError
from virnuc_dask.inputs.duplicates import shown_id
from virnuc_dask.inputs.reads import ReadBatch, header_ids, split_lines

_FOUR_LINES = "FASTQ records are four lines: @id, bases, +, qualities (wrapped FASTQ is not read)"


def has_boundary(block: bytes) -> bool:
    """Whether a block can end a record (any line end will do: records are counted)."""
    return b"\n" in block


def parse(data: bytes, line: int, final: bool, text: str) -> tuple[ReadBatch | None, int, int]:
    """Parse the whole records at the start of ``data``.

    Parameters
    ----------
    data
        Bytes of the file from the start of a record (line ``line``).
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
    if final:
        # Blank lines after the last record are fine; anything else must make whole records.
        count = len(ends)
        while count and ends[count - 1] - starts[count - 1] <= _cr(a, ends[count - 1]):
            count -= 1
        complete = count // 4
        if count % 4:
            _truncated(a, starts, ends, complete, count, line, text)
    else:
        complete = len(ends) // 4
    if not complete:
        return None, 0, 0
    n4 = 4 * complete
    used = min(int(ends[n4 - 1]) + 1, len(a))  # through the last line end taken
    starts, ends = starts[:n4], ends[:n4]
    # Line ends without a CR before them (CRLF files).
    ends = ends - (a[np.maximum(ends - 1, 0)] == 13) * (ends > starts)
    header, bases, plus, quality = (starts[k::4] for k in range(4))
    header_end, bases_end, _, quality_end = (ends[k::4] for k in range(4))
    first_line = line + 4 * np.arange(complete, dtype=np.int64)
    not_header = np.flatnonzero((header_end <= header) | (a[np.minimum(header, len(a) - 1)] != 64))
    not_plus = np.flatnonzero((ends[2::4] <= plus) | (a[np.minimum(plus, len(a) - 1)] != 43))
    length = bases_end - bases
    mismatch = np.flatnonzero(quality_end - quality != length)
    problems = [p[0] for p in (not_header, not_plus, mismatch) if len(p)]
    if problems:
        _refuse(a, int(min(problems)), not_header, not_plus, header, header_end, bases_end, bases,
                quality, quality_end, plus, ends, first_line, text)  # fmt: skip
    ids, id_offsets, id_text = header_ids(a, header, header_end, first_line, text)

    def base_line(read: int, position: int) -> int:
        return int(first_line[read]) + 1

    batch = ReadBatch(a, bases, length, ids, id_offsets, first_line, id_text, base_line)
    return batch, used, n4


def _cr(a: np.ndarray, end: int) -> int:
    """1 when the line ending at ``end`` ends with a CR (a blank CRLF line), else 0."""
    return int(end > 0 and a[end - 1] == 13)


def _line_text(a: np.ndarray, start: int, end: int) -> str:
    shown = a[start : min(end, start + 40)].tobytes().decode("utf-8", "replace").rstrip("\r")
    return repr(shown + ("..." if end - start > 40 else ""))


def _read_id(a: np.ndarray, start: int, end: int) -> str:
    words = a[start + 1 : end].tobytes().split()
    return shown_id(words[0].decode("utf-8", "replace")) if words else "(no id)"


def _refuse(a, record, not_header, not_plus, header, header_end, bases_end, bases, quality,
            quality_end, plus, ends, first_line, text) -> None:  # fmt: skip
    """Raise the message for the first malformed record of a batch."""
    at = int(first_line[record])
    if record in not_header:
        raise VirnucError(
            f"{text}, line {at}: expected a read's header line starting with '@', found "
            f"{_line_text(a, header[record], header_end[record])}; {_FOUR_LINES}"
        )
    ident = _read_id(a, int(header[record]), int(header_end[record]))
    if record in not_plus:
        raise VirnucError(
            f"{text}, line {at + 2}: expected the '+' line of read {ident}, found "
            f"{_line_text(a, plus[record], ends[4 * record + 2])}; {_FOUR_LINES}"
        )
    raise VirnucError(
        f"{text}, line {at + 3}: read {ident} has {bases_end[record] - bases[record]} bases "
        f"but {quality_end[record] - quality[record]} quality letters; each base needs one"
    )


def _truncated(a, starts, ends, complete, count, line, text) -> None:
    """Raise the message for a file that ends inside its last record."""
    first = 4 * complete
    at = line + first
    if a[starts[first] : starts[first] + 1].tobytes() != b"@":
        raise VirnucError(
            f"{text}, line {at}: expected a read's header line starting with '@', found "
            f"{_line_text(a, starts[first], ends[first])}; {_FOUR_LINES}"
        )
    ident = _read_id(a, int(starts[first]), int(ends[first]))
    have = count - first
    raise VirnucError(
        f"{text}, line {at + have - 1}: the file ends inside the record of read {ident} (it has "
        f"{have} of its 4 lines); is the file truncated?"
    )
