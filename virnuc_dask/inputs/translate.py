"""Six-frame translation, vectorised: numpy codon lookups over whole groups of sequences.

Frames are numbered as VirNucPro numbers them: ``F1``, ``F2``, ``F3`` start at offsets 0, 1
and 2 of the sequence, ``R1``, ``R2``, ``R3`` at offsets 0, 1 and 2 of its reverse complement;
only complete codons are translated. A codon holding any letter other than ``A``, ``C``, ``G``,
``T`` or ``U`` (either case; an IUPAC code such as ``N``) translates to ``X``.

How it is computed, with no Python loop over codons or sequences:

- Sequences of one length form a group, a 2-D array of bases (a read file holds few lengths).
  Each base becomes a code by arithmetic, ``(byte >> 1) & 3``: A 0, C 1, T/U 2, G 3 in
  either case, the complement being ``code ^ 2``; the rare other letters (``N``, IUPAC
  codes: 4) are found by deleting the bases from the bytes, which leaves them. Every position
  of a group gets the number ``25 a + 5 b + c`` of the codon that starts there (125 values).
  One table gives that codon's amino acid, another that of its reverse complement, a third
  whether either is a stop; tables are applied with ``bytes.translate``, twice as fast as
  numpy's indexing. A forward frame is every third column from its offset; a reverse frame
  the same columns read backwards from the end.
- ``stop-free`` (VirNucPro's rule) keeps a frame when none of its codons is a stop: one
  OR-reduction per residue class of the stop bits, then only the kept frames are looked up.
- ``orfs`` splits every frame at its stop codons and keeps the pieces of at least
  ``min_peptide`` residues; a piece is numbered by its place in the frame (one more than the
  stops before it), so its number does not depend on ``min_peptide``.
- A peptide of ``X`` only (a frame of ``N`` s) is dropped: it says nothing about the read, and
  VirNucPro, which drops ambiguous codons, gets an empty peptide there and drops it too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from virnuc_dask.inputs.genetic_codes import codon_table
from virnuc_dask.inputs.nucleotide import AMBIGUOUS

#: Frame names, in the order of their numbers in :attr:`Peptides.frame`.
FRAMES = ("F1", "F2", "F3", "R1", "R2", "R3")
#: How frames become peptides.
FRAME_MODES = ("stop-free", "orfs")
#: Peptides shorter than this are dropped in ``orfs`` mode unless asked otherwise.
DEFAULT_MIN_ORF = 30

_X, _STOP, _NEWLINE = ord("X"), ord("*"), ord("\n")
#: Bases in the order of their arithmetic codes, ``(byte >> 1) & 3``.
_BY_CODE = "ACTG"
_BASES = b"ACGTUacgtu"
_AMBIGUOUS = frozenset(AMBIGUOUS + AMBIGUOUS.lower())
#: Bases of one group handled at once (the temporaries are a few bytes per base).
_GROUP_BASES = 1 << 22


class InvalidBase(Exception):
    """A letter that is neither a base nor an IUPAC ambiguity code (the caller names it)."""

    def __init__(self, sequence: int, position: int, byte: int) -> None:
        super().__init__(sequence, position, byte)
        self.sequence, self.position, self.byte = sequence, position, byte


@dataclass(frozen=True)
class CodonLookup:
    """A genetic code as three tables over codon numbers ``25 a + 5 b + c``.

    Base codes are those of :func:`base_codes` (A 0, C 1, T 2, G 3, ambiguous 4). Each table
    has 256 entries (the 125 codon numbers, then unused ones), as ``bytes`` for
    ``bytes.translate``.

    Attributes
    ----------
    forward
        The amino acid (a byte) of each codon; ``X`` when it holds an ambiguous base.
    reverse
        The amino acid of each codon's reverse complement.
    stops
        Bit 1: the codon is a stop; bit 2: its reverse complement is.
    """

    forward: bytes
    reverse: bytes
    stops: bytes

    @classmethod
    @functools.cache
    def for_code(cls, genetic_code: int) -> CodonLookup:
        """The tables of NCBI genetic code ``genetic_code``."""
        table = codon_table(genetic_code)
        forward = np.full(256, _X, dtype=np.uint8)
        reverse = np.full(256, _X, dtype=np.uint8)
        for a in range(4):
            for b in range(4):
                for c in range(4):
                    number = 25 * a + 5 * b + c
                    codon = _BY_CODE[a] + _BY_CODE[b] + _BY_CODE[c]
                    complement = _BY_CODE[c ^ 2] + _BY_CODE[b ^ 2] + _BY_CODE[a ^ 2]
                    forward[number] = ord(table[codon])
                    reverse[number] = ord(table[complement])
        stops = (forward == _STOP).astype(np.uint8) | ((reverse == _STOP).astype(np.uint8) << 1)
        return cls(forward.tobytes(), reverse.tobytes(), stops.tobytes())


def _apply(table: bytes, values: np.ndarray) -> np.ndarray:
    """``table[values]`` for a uint8 array, through ``bytes.translate``."""
    out = np.frombuffer(np.ascontiguousarray(values).tobytes().translate(table), dtype=np.uint8)
    return out.reshape(values.shape)


def base_codes(raw: np.ndarray) -> tuple[np.ndarray, bool]:
    """Codes of bases (uint8): A 0, C 1, T or U 2, G 3 (either case), IUPAC codes 4.

    Returns the codes and whether any is 4.

    Raises
    ------
    InvalidBase
        For any other letter, with ``sequence`` the row of ``raw`` (its first such row) and
        ``position`` the column.
    """
    code = (raw >> 1) & 3
    others = raw.tobytes().translate(None, _BASES)  # the letters that are not bases
    if others:
        letters = set(others)
        invalid = [letter for letter in letters if letter not in _AMBIGUOUS]
        if invalid:
            bad = np.isin(raw, invalid)
            row = int(np.argmax(bad.any(axis=1)))
            column = int(np.argmax(bad[row]))
            raise InvalidBase(row, column, int(raw[row, column]))
        for letter in letters:
            code[raw == letter] = 4
    return code, bool(others)


@dataclass
class Peptides:
    """The peptides of a batch of sequences, in the order (sequence, frame, piece).

    Attributes
    ----------
    residues
        The peptides' letters (uint8), in lines (a peptide, or in ``orfs`` mode a whole frame
        that holds pieces), in the order they were made, not the order of the rows below.
    start, length
        Per peptide: offset of its first letter in ``residues``, and its residues.
    sequence
        The batch's sequence it comes from.
    frame
        Its frame, an index into :data:`FRAMES`.
    orf
        Its place among its frame's stop-separated pieces (1-based); 1 in ``stop-free`` mode.
    nt_start, nt_end
        The bases it was translated from, 0-based and half-open on the forward strand of its
        sequence.
    blocks
        Blocks of ``residues`` whose lines are whole peptides of one length (``stop-free``):
        ``(offset, lines, length)`` each. Empty in ``orfs`` mode, whose lines are whole frames.
    """

    residues: np.ndarray
    start: np.ndarray
    length: np.ndarray
    sequence: np.ndarray
    frame: np.ndarray
    orf: np.ndarray
    nt_start: np.ndarray
    nt_end: np.ndarray
    blocks: list[tuple[int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.length)

    def peptide(self, row: int) -> bytes:
        """The letters of one peptide."""
        start = int(self.start[row])
        return self.residues[start : start + int(self.length[row])].tobytes()


def translate_frames(
    seq: np.ndarray,
    start: np.ndarray,
    length: np.ndarray,
    lookup: CodonLookup,
    *,
    frames: str = "stop-free",
    min_peptide: int = 1,
) -> Peptides:
    """Translate sequences in six frames and keep the peptides that ``frames`` asks for.

    Parameters
    ----------
    seq
        Bases (uint8); sequence ``i`` is ``seq[start[i] : start[i] + length[i]]``. Sequences
        may overlap (pieces of one read).
    start, length
        Where each sequence is in ``seq``.
    lookup
        The genetic code.
    frames
        ``"stop-free"``: a frame without any stop codon, whole. ``"orfs"``: every piece of a
        frame between stop codons.
    min_peptide
        Peptides shorter than this are dropped (an empty one always is).

    Raises
    ------
    InvalidBase
        A letter that is not a base or an IUPAC code: the first such one of the batch.
    """
    if frames not in FRAME_MODES:
        raise ValueError(f"frames must be one of {FRAME_MODES}, not {frames!r}")
    start = np.asarray(start, dtype=np.int64)
    length = np.asarray(length, dtype=np.int64)
    parts = _Parts()
    if len(length) and length.min() == length.max():  # reads of one length: no sort needed
        order = np.arange(len(length))
    else:
        order = np.argsort(length, kind="stable")
    sorted_lengths = length[order]
    edges = np.concatenate([[0], np.flatnonzero(np.diff(sorted_lengths)) + 1, [len(order)]])
    try:
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            size = int(sorted_lengths[a]) if b > a else 0
            rows_at_once = max(1, _GROUP_BASES // max(size, 1))
            for first in range(a, b, rows_at_once):
                rows = order[first : min(b, first + rows_at_once)]
                _group(seq, start[rows], rows, size, lookup, frames, max(1, min_peptide), parts)
    except InvalidBase:
        raise _first_invalid(seq, start, length) from None
    return parts.peptides()


def _first_invalid(seq: np.ndarray, start: np.ndarray, length: np.ndarray) -> InvalidBase:
    """The batch's first letter that is not a base (groups run by length, not in order)."""
    for row in range(len(start)):
        try:
            base_codes(seq[start[row] : start[row] + length[row]].reshape(1, -1))
        except InvalidBase as bad:
            return InvalidBase(row, bad.position, bad.byte)
    raise AssertionError("no invalid letter found again")


def _group(seq, starts, rows, size, lookup, frames, min_peptide, parts) -> None:
    """Translate sequences of one length ``size`` (at ``starts``; ``rows`` of the batch)."""
    raw = sliding_window_view(seq, size)[starts] if size else np.empty((len(rows), 0), np.uint8)
    try:
        code, ambiguous = base_codes(raw)
    except InvalidBase as bad:
        raise InvalidBase(int(rows[bad.sequence]), bad.position, bad.byte) from None
    if size < 3:
        return
    codons = code[:, :-2] * 25
    codons += code[:, 1:-1] * 5
    codons += code[:, 2:]
    stops = _apply(lookup.stops, codons)
    if frames == "stop-free":
        _stop_free(codons, stops, rows, size, lookup, min_peptide, ambiguous, parts)
    else:
        _orfs(codons, stops, rows, size, lookup, min_peptide, ambiguous, parts)


def _frame_columns(frame: int, size: int) -> tuple[slice, int, int, int]:
    """Codon columns of ``frame`` in a group of ``size`` bases, its codons and bases.

    Returns the columns (of the codon-number array, in reading order), the number of codons,
    and the frame's first and last base on the forward strand (half-open) for all codons.
    """
    offset = frame % 3
    count = (size - offset) // 3
    if frame < 3:
        return slice(offset, size - 2, 3), count, offset, offset + 3 * count
    first = size - 3 - offset  # the forward position of the reverse frame's first codon
    columns = slice(first, None, -3) if count else slice(0, 0)
    return columns, count, size - offset - 3 * count, size - offset


def _stop_free(codons, stops, rows, size, lookup, min_peptide, ambiguous, parts) -> None:
    # Stop bits of each residue class (positions 0, 3, 6, ... / 1, 4, ... / 2, 5, ...): a
    # forward frame is one class, a reverse frame another, depending on the length.
    classes = [np.bitwise_or.reduce(stops[:, k::3], axis=1) for k in range(min(3, size - 2))]
    for frame in range(6):
        columns, count, nt_start, nt_end = _frame_columns(frame, size)
        if count < min_peptide:
            continue
        bit = 1 if frame < 3 else 2
        keep = np.flatnonzero((classes[columns.start % 3] & bit) == 0)
        if not len(keep):
            continue
        table = lookup.forward if frame < 3 else lookup.reverse
        letters = _apply(table, codons[keep][:, columns])
        if ambiguous:  # frames of ambiguous bases only (all X) carry nothing
            informative = np.flatnonzero((letters != _X).any(axis=1))
            keep, letters = keep[informative], letters[informative]
            if not len(keep):
                continue
        parts.add_rows(
            letters,
            sequence=rows[keep],
            frame=frame,
            orf=1,
            nt_start=nt_start,
            nt_end=nt_end,
        )


def _orfs(codons, stops, rows, size, lookup, min_peptide, ambiguous, parts) -> None:
    n = len(rows)
    for frame in range(6):
        columns, count, frame_start, frame_end = _frame_columns(frame, size)
        if count < min_peptide:
            continue
        bit = 1 if frame < 3 else 2
        flat = np.flatnonzero(stops[:, columns] & bit)
        stop_row, stop_at = np.divmod(flat, count)
        # Each row's boundaries in reading order: -1, its stops, ``count``; pieces lie
        # between two. Laid out row after row without sorting: the stops come row-major.
        per_row = np.bincount(stop_row, minlength=n)
        row_first = np.cumsum(per_row + 2) - (per_row + 2)
        bounds = np.empty(int(per_row.sum()) + 2 * n, dtype=np.int64)
        bounds[row_first] = -1
        bounds[row_first + per_row + 1] = count
        stop_first = np.cumsum(per_row) - per_row
        bounds[row_first[stop_row] + 1 + np.arange(len(flat)) - stop_first[stop_row]] = stop_at
        last = np.zeros(len(bounds), dtype=bool)
        last[row_first + per_row + 1] = True
        at = np.flatnonzero(~last)
        begin, end = bounds[at] + 1, bounds[at + 1]
        row = np.repeat(np.arange(n), per_row + 1)
        # Place of each piece in its frame: 1 + the stops before it.
        place = (at - row_first[row] + 1).astype(np.int32)
        wanted = np.flatnonzero(end - begin >= min_peptide)
        if not len(wanted):
            continue
        begin, end, row, place = begin[wanted], end[wanted], row[wanted], place[wanted]
        if frame < 3:
            nt_start, nt_end = frame_start + 3 * begin, frame_start + 3 * end
        else:
            nt_start, nt_end = frame_end - 3 * end, frame_end - 3 * begin
        table = lookup.forward if frame < 3 else lookup.reverse
        with_pieces, local_row = np.unique(row, return_inverse=True)
        letters = _apply(table, codons[with_pieces][:, columns])
        unknown = letters == _X if ambiguous else None
        if ambiguous and unknown.any():
            # Pieces of ambiguous bases only (all X) carry nothing: found by a prefix sum.
            known = np.zeros((len(with_pieces), count + 1), dtype=np.int32)
            np.cumsum(~unknown, axis=1, out=known[:, 1:])
            pick = np.flatnonzero(known[local_row, end] > known[local_row, begin])
            if not len(pick):
                continue
            local_row, begin, end, place = local_row[pick], begin[pick], end[pick], place[pick]
            row, nt_start, nt_end = row[pick], nt_start[pick], nt_end[pick]
        parts.add_pieces(
            letters,
            local_row,
            begin,
            end,
            sequence=rows[row],
            frame=frame,
            orf=place,
            nt_start=nt_start,
            nt_end=nt_end,
        )


class _Parts:
    """Peptides collected group by group, frame by frame; sorted once at the end."""

    def __init__(self) -> None:
        self.residues: list[np.ndarray] = []
        self.columns: dict[str, list[np.ndarray]] = {
            name: []
            for name in ("start", "length", "sequence", "frame", "orf", "nt_start", "nt_end")
        }
        self.size = 0
        self.blocks: list[tuple[int, int, int]] = []

    def _add(self, residues: np.ndarray, start: np.ndarray, length: np.ndarray, **rows) -> None:
        self.columns["start"].append(start + self.size)
        self.columns["length"].append(length)
        count = len(length)
        for name, values in rows.items():
            if np.ndim(values) == 0:
                values = np.full(count, values)
            self.columns[name].append(np.asarray(values))
        self.residues.append(residues)
        self.size += len(residues)

    def add_rows(self, letters: np.ndarray, **rows) -> None:
        """Peptides of equal length, one per row of ``letters``."""
        count, width = letters.shape
        lines = np.empty((count, width + 1), dtype=np.uint8)
        lines[:, :width] = letters
        lines[:, width] = _NEWLINE
        start = np.arange(count, dtype=np.int64) * (width + 1)
        self.blocks.append((self.size, count, width))
        self._add(lines.ravel(), start, np.full(count, width, dtype=np.int64), **rows)

    def add_pieces(self, letters, row, begin, end, **rows) -> None:
        """Pieces ``letters[row, begin:end]`` of whole frames, one frame per row of ``letters``.

        The frames are kept whole (stops included), each followed by a line feed; a piece
        points at its letters inside its frame. No per-letter gather is needed.
        """
        count, width = letters.shape
        lines = np.empty((count, width + 1), dtype=np.uint8)
        lines[:, :width] = letters
        lines[:, width] = _NEWLINE
        start = row.astype(np.int64) * (width + 1) + begin
        self._add(lines.ravel(), start, (end - begin).astype(np.int64), **rows)

    def peptides(self) -> Peptides:
        empty = {
            "start": np.int64,
            "length": np.int64,
            "sequence": np.int64,
            "frame": np.int8,
            "orf": np.int32,
            "nt_start": np.int64,
            "nt_end": np.int64,
        }
        columns = {
            name: np.concatenate(values).astype(empty[name], copy=False)
            if values
            else np.empty(0, dtype=empty[name])
            for name, values in self.columns.items()
        }
        order = np.lexsort((columns["orf"], columns["frame"], columns["sequence"]))
        residues = np.concatenate(self.residues) if self.residues else np.empty(0, dtype=np.uint8)
        return Peptides(
            residues=residues, blocks=self.blocks, **{k: v[order] for k, v in columns.items()}
        )
