"""Reads files: FASTA or FASTQ, plain or gzip, read once in blocks of whole records.

:func:`read_batches` opens a file (a pipe works too: nothing is copied), tells FASTA from
FASTQ by its first letter (``>`` or ``@``), and yields :class:`ReadBatch` es of whole records,
each a few megabytes, parsed with numpy (:mod:`~virnuc_dask.inputs.fastq`,
:mod:`~virnuc_dask.inputs.fasta_reads`). The bases stay in the block they were read in; a
batch says where each read is.

Ids follow the rules of the protein FASTA (``docs/input.md``): the first word of the header,
UTF-8 without control characters, at most ``MAX_ID_BYTES`` bytes.

A letter that is not a base stops the file (:func:`bad_base_message`). When the reads of its
batch are those of proteins (the nucleotide rule in reverse,
:func:`~virnuc_dask.inputs.nucleotide.looks_like_protein`), the message says so for the whole
file and to drop ``--translate``: a protein file given as reads is the likely mistake, and its
first letter that is not a base tells the user nothing. Otherwise (reads with a stray letter)
it names the letter, its read, line and position.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from virnuc_dask.errors import VirnucError, option
from virnuc_dask.inputs.duplicates import shown_id
from virnuc_dask.inputs.fasta import MAX_ID_BYTES
from virnuc_dask.inputs.nucleotide import SAMPLE_LETTERS, letter_counts, looks_like_protein
from virnuc_dask.inputs.staging import open_blocks, shown

_UTF8_BOM = b"\xef\xbb\xbf"
NEWLINE = b"\n"
_CONTROL = np.zeros(256, dtype=bool)
_CONTROL[list(range(32)) + [127]] = True


@dataclass
class ReadBatch:
    """Whole records of one reads file, parsed: where the bases and ids of each read are.

    Attributes
    ----------
    seq
        Bytes holding the bases (uint8): the block itself for FASTQ, the bases alone for FASTA.
    start, length
        Per read: offset of its first base in ``seq``, and its bases.
    ids, id_offsets
        The ids, UTF-8, back to back (uint8); id ``i`` is ``ids[id_offsets[i]:id_offsets[i+1]]``.
    line
        Per read, the 1-based line of its header in the file.
    id_text
        The ids joined by line feeds (bytes): ``id_text.split(b"\\n")`` lists them.
    base_line
        ``base_line(read, position)``: the line of the file holding a read's base (0-based
        position), for messages.
    """

    seq: np.ndarray
    start: np.ndarray
    length: np.ndarray
    ids: np.ndarray
    id_offsets: np.ndarray
    line: np.ndarray
    id_text: bytes
    base_line: Callable[[int, int], int]

    def __len__(self) -> int:
        return len(self.length)

    def id(self, read: int) -> str:
        """The id of one read."""
        return self.ids[self.id_offsets[read] : self.id_offsets[read + 1]].tobytes().decode()


def ragged(buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``buffer[starts[i] : starts[i] + lengths[i]]`` for every ``i``, back to back."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if not total:
        return np.empty(0, dtype=buffer.dtype)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (np.cumsum(lengths) - lengths), lengths)
    return buffer[shift + np.arange(total, dtype=np.int64)]


def split_lines(data: bytes, final: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bytes of ``data`` and where each of its lines starts and ends (before the newline).

    With ``final`` (``data`` runs to the end of the file) a last line without a newline counts.
    """
    a = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(a == 10)
    if final and len(a) and a[-1] != 10:
        ends = np.append(ends, len(a))  # the last line has no line end
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    return a, starts, ends


def offsets(lengths: np.ndarray) -> np.ndarray:
    """Offsets (``len + 1``, int64, from 0) of items of ``lengths`` laid back to back."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def header_ids(
    a: np.ndarray, header: np.ndarray, end: np.ndarray, lines: np.ndarray, text: str
) -> tuple[np.ndarray, np.ndarray, bytes]:
    """The ids of header lines: the first word after the ``>`` or ``@``, checked.

    Parameters
    ----------
    a
        The block (uint8).
    header, end
        Start and end (without line end) of each header line in ``a``.
    lines
        Each header's line number, for messages.
    text
        The file as messages name it.

    Returns
    -------
    ids, id_offsets, id_text
        The ids back to back, their offsets, and the ids joined by line feeds.
    """
    # The header lines alone (without the '>' or '@'), back to back: blanks end the ids.
    first = header + 1
    size = np.maximum(end - first, 0)
    text_of = ragged(a, first, size)
    text_at = offsets(size)
    blank = np.flatnonzero((text_of == 32) | (text_of == 9))
    at = np.searchsorted(blank, text_at[:-1])
    after = text_at[1:].copy()
    found = at < len(blank)
    after[found] = np.minimum(blank[at[found]], after[found])
    length = after - text_at[:-1]
    start = text_at[:-1].copy()
    # Ids that start after spaces ('@ read1') are rare: found word by word.
    for row in np.flatnonzero(length == 0):
        line = text_of[text_at[row] : text_at[row + 1]].tobytes()
        words = line.split()
        if not words:
            raise VirnucError(
                f"{text}, line {lines[row]}: header has no id after "
                f"{chr(a[header[row]])!r}; give every record an id"
            )
        start[row] += line.index(words[0])
        length[row] = len(words[0])
    ids = ragged(text_of, start, length)
    id_offsets = offsets(length)
    return ids, id_offsets, _check_ids(ids, id_offsets, lines, text)


def _check_ids(ids: np.ndarray, id_offsets: np.ndarray, lines: np.ndarray, text: str) -> bytes:
    """Refuse ids with control characters, invalid UTF-8, or over ``MAX_ID_BYTES`` bytes.

    Returns the ids joined by line feeds.
    """
    control = np.flatnonzero(_CONTROL[ids])
    if len(control):
        row = int(np.searchsorted(id_offsets, control[0], side="right")) - 1
        raise VirnucError(
            f"{text}, line {lines[row]}: id contains the control character "
            f"{int(ids[control[0]]):#04x}; remove it from the header"
        )
    lengths = np.diff(id_offsets)
    long = np.flatnonzero(lengths > MAX_ID_BYTES)
    if len(long):
        row = int(long[0])
        ident = ids[id_offsets[row] : id_offsets[row + 1]].tobytes().decode(errors="replace")
        raise VirnucError(
            f"{text}, line {lines[row]}: id '{ident[:60]}...' is {lengths[row]} bytes long "
            f"(UTF-8), over the limit of {MAX_ID_BYTES}; shorten the header's first word"
        )
    # Line feeds between the ids: an id cut inside a multi-byte letter cannot pass as valid.
    joined = np.full(len(ids) + len(lengths) - 1, ord("\n"), dtype=np.uint8)
    joined[np.arange(len(ids)) + np.repeat(np.arange(len(lengths)), lengths)] = ids
    text_bytes = joined.tobytes()
    try:
        text_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        row = joined[: error.start].tobytes().count(b"\n")
        raise VirnucError(
            f"{text}, line {lines[row]}: id is not valid UTF-8 (byte "
            f"{joined[error.start]:#04x}); write ids in ASCII or UTF-8"
        ) from None
    return text_bytes


def read_batches(path: str, digest=None, storage=None) -> Iterator[ReadBatch]:
    """The records of a reads file (FASTA or FASTQ, plain or gzip), in batches.

    Parameters
    ----------
    path
        The file (or pipe, ``-`` for standard input, or fsspec URL).
    digest
        A ``hashlib`` object updated with the file's bytes as stored, for fingerprints.
    storage
        fsspec options (:class:`~virnuc_dask.storage.urls.StorageOptions`) for a URL.

    Raises
    ------
    VirnucError
        For every problem of the file, naming it and the line.
    """
    from virnuc_dask.inputs import fasta_reads, fastq

    text = shown(path)
    with open_blocks(path, digest, storage) as blocks:
        parts: list[bytes] = []
        line, form = 1, None
        while True:
            pending = b"".join(parts) if len(parts) > 1 else (parts[0] if parts else b"")
            block = blocks.read(where=functools.partial(_where, line, pending))
            if form is None:
                if line == 1 and not pending and block.startswith(_UTF8_BOM):
                    block = block[len(_UTF8_BOM) :]
                first = (pending + block).lstrip()[:1]
                if not first and block:
                    parts = [pending + block]
                    continue
                if not first:
                    _refuse_empty(text, pending)
                if first not in (b">", b"@"):
                    raise VirnucError(
                        f"{text}: not FASTA or FASTQ: the first letter is {first.decode()!r}, "
                        "where a FASTA file starts with '>' and a FASTQ file with '@'"
                    )
                form = fasta_reads if first == b">" else fastq
                # Blank lines before the first record are skipped (counted as lines).
                data = pending + block
                cut = data.rfind(b"\n", 0, data.index(first)) + 1
                line += data.count(b"\n", 0, cut)
                pending, block = b"", data[cut:]
            final = not block
            if not final and not form.has_boundary(block):
                parts.append(block)  # a record longer than a block: read on
                continue
            data = pending + block
            batch, used, lines = form.parse(data, line, final, text)
            parts = [data[used:]] if used < len(data) else []
            line += lines
            if batch is not None and len(batch):
                yield batch
            if final:
                return


def _where(line: int, pending: bytes) -> str:
    """Where a truncated file stops: the line after those read (``pending`` is unparsed)."""
    return f", in line {line + pending.count(NEWLINE)}"


def _refuse_empty(text: str, pending: bytes) -> None:
    if not pending:
        raise VirnucError(
            f"{text}: the file is empty; reads come as FASTA ('>id' lines, each followed by "
            "bases) or FASTQ (four lines a read) (leave empty files out of the inputs)"
        )
    blank = pending.count(b"\n") or 1
    raise VirnucError(
        f"{text}: no record in its {blank} blank line(s); is this a FASTA or FASTQ file?"
    )


def bad_base_message(batch: ReadBatch, read: int, position: int, byte: int, text: str) -> str:
    """The message for a letter that is not a base, naming file, line, read and position.

    When the batch's reads are proteins (the nucleotide rule in reverse), the message names
    the file and says to drop ``--translate`` instead.
    """
    bases = ragged(batch.seq, batch.start, batch.length)[:SAMPLE_LETTERS]
    protein = looks_like_protein(letter_counts(bases))
    if protein is not None:
        share, letters = protein
        names = list(letters.decode())
        such = " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]
        return (
            f"{text} holds proteins, not nucleotide reads ({share:.0%} of its letters other "
            f"than N and X are not nucleotide codes, such as {such}); to embed its sequences "
            f"as proteins, drop {option('translate', 'six-frame')}"
        )
    what = f"letter {chr(byte)!r}" if 0x21 <= byte < 0x7F else f"byte {byte:#04x}"
    return (
        f"{text}, line {batch.base_line(read, position)}: read {shown_id(batch.id(read))}: "
        f"{what} at position {position + 1} is not a nucleotide (A, C, G, T, U or an IUPAC code "
        "such as N)"
    )
