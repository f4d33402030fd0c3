"""Index: one scan of the FASTA inputs into numpy arrays, and reading sequences back by offset.

The scan validates every record (so a bad letter stops the run before any cluster starts, with
the file, line and id in the message) and keeps, per sequence, the byte range of its residue
lines in a plain file. Workers later read exactly their own sequences with one ``seek`` each;
the Dask graph only ever carries row numbers.

Decisions (see ``docs/decisions.md``):

- The id is the first whitespace-separated word of the header, decoded as UTF-8.
- Upper and lower case are the same residue; whitespace inside sequence lines (spaces, tabs,
  CR of CRLF files) is ignored; blank lines between records are accepted.
- A ``*`` at the very end of a record (a stop codon) is dropped; anywhere else it is an error.
- ``.`` and ``-`` are letters of fair-esm's alphabet and are accepted as such.
- Any other byte is an error naming the sequence and position, unless ``invalid_to_x`` is set,
  which reads it as ``X`` (an inner ``*`` included).
- gzip inputs (recognised by their magic bytes, not their name) are decompressed once into the
  staging directory during the scan, so that workers can seek in them.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from virnuc_dask.errors import VirnucError
from virnuc_dask.tokens import RESIDUE_LETTERS

_WHITESPACE = b" \t\r\n\v\f"
_VALID = RESIDUE_LETTERS + RESIDUE_LETTERS.lower() + _WHITESPACE
_TO_UPPER = bytes.maketrans(RESIDUE_LETTERS.lower(), RESIDUE_LETTERS)
# Every byte that is neither whitespace nor a residue letter becomes X (for invalid_to_x).
_TO_X = bytes.maketrans(
    bytes(b for b in range(256) if b not in _VALID), b"X" * (256 - len(set(_VALID)))
)
_GZIP_MAGIC = b"\x1f\x8b"

#: What to do with an id seen twice: refuse the input, or keep both by suffixing.
DUPLICATE_POLICIES = ("error", "suffix")


@dataclass
class FastaIndex:
    """Where every sequence of the inputs is, as numpy arrays (one row per sequence).

    Attributes
    ----------
    inputs
        The input paths as given.
    files
        Paths the sequences are read from: the inputs, or plain copies of gzip inputs.
    file, offset, span
        Per sequence: file number, byte offset of its first residue line, and bytes up to the
        end of its last residue line.
    length
        Residues per sequence (whitespace and a trailing ``*`` not counted).
    line
        Line number of the header (1-based), for messages.
    id_bytes, id_offsets
        All ids, UTF-8, back to back; id ``i`` is ``id_bytes[id_offsets[i]:id_offsets[i+1]]``.
    digest
        BLAKE2b of the inputs' bytes, for fingerprints.
    invalid_to_x
        Whether letters outside the alphabet are read as ``X``.
    """

    inputs: list[str]
    files: list[str]
    file: np.ndarray
    offset: np.ndarray
    span: np.ndarray
    length: np.ndarray
    line: np.ndarray
    id_bytes: np.ndarray
    id_offsets: np.ndarray
    digest: str
    invalid_to_x: bool = False

    def __len__(self) -> int:
        return len(self.length)

    def id(self, row: int) -> str:
        """Return the id of one sequence."""
        start, stop = self.id_offsets[row], self.id_offsets[row + 1]
        return self.id_bytes[start:stop].tobytes().decode()

    def ids(self, rows: np.ndarray | None = None) -> list[str]:
        """Return the ids of ``rows`` (default: all), in that order."""
        rows = range(len(self)) if rows is None else rows
        return [self.id(int(r)) for r in rows]

    _ARRAYS = ("file", "offset", "span", "length", "line", "id_bytes", "id_offsets")

    def save(self, directory: str | Path) -> None:
        """Write the index as ``.npy`` files plus a small JSON, for workers to memory-map."""
        import json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in self._ARRAYS:
            np.save(directory / f"{name}.npy", getattr(self, name))
        meta = {
            "inputs": self.inputs,
            "files": self.files,
            "digest": self.digest,
            "invalid_to_x": self.invalid_to_x,
        }
        (directory / "index.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> FastaIndex:
        """Open an index written by :meth:`save`, its arrays memory-mapped read-only."""
        import json

        directory = Path(directory)
        meta = json.loads((directory / "index.json").read_text())
        arrays = {n: np.load(directory / f"{n}.npy", mmap_mode="r") for n in cls._ARRAYS}
        return cls(**meta, **arrays)


def build_index(
    inputs: list[str | Path],
    staging: str | Path | None = None,
    *,
    invalid_to_x: bool = False,
    duplicate_ids: str = "error",
) -> FastaIndex:
    """Scan FASTA files (plain or gzip) into a :class:`FastaIndex`, validating every record.

    Parameters
    ----------
    inputs
        FASTA files, plain or gzip-compressed, multi-line records, any line endings.
    staging
        Directory for plain copies of gzip inputs; required when an input is gzip.
    invalid_to_x
        Read letters outside fair-esm's alphabet as ``X`` instead of refusing them.
    duplicate_ids
        ``"error"`` refuses an id seen twice; ``"suffix"`` keeps both, renaming later
        occurrences ``ID.2``, ``ID.3``, ...

    Raises
    ------
    VirnucError
        For every problem of the input, naming the file and the line or id.
    """
    if not inputs:
        raise VirnucError("no input files given")
    if duplicate_ids not in DUPLICATE_POLICIES:
        raise VirnucError(f"duplicate_ids must be one of {DUPLICATE_POLICIES}")
    scan = _Scan(invalid_to_x)
    files, digest = [], hashlib.blake2b(digest_size=16)
    for number, path in enumerate(inputs):
        path = str(path)
        plain = _plain_copy(path, number, staging)
        digest.update(_file_digest(plain).encode())
        scan.file(plain, number, shown_as=path)
        files.append(plain)
    if not len(scan.length):
        raise VirnucError(f"no sequences in {', '.join(map(str, inputs))}: no '>' header found")
    index = FastaIndex(
        inputs=[str(p) for p in inputs],
        files=files,
        file=np.frombuffer(scan.file_no, dtype=np.int32).copy(),
        offset=np.frombuffer(scan.offset, dtype=np.int64).copy(),
        span=np.frombuffer(scan.span, dtype=np.int64).copy(),
        length=np.frombuffer(scan.length, dtype=np.int64).copy(),
        line=np.frombuffer(scan.line, dtype=np.int64).copy(),
        id_bytes=np.frombuffer(bytes(scan.ids), dtype=np.uint8),
        id_offsets=np.frombuffer(scan.id_offsets, dtype=np.int64).copy(),
        digest=digest.hexdigest(),
        invalid_to_x=invalid_to_x,
    )
    _check_duplicates(index, np.frombuffer(scan.hashes, dtype=np.int64), duplicate_ids)
    return index


class _Scan:
    """The state of one pass over the inputs: growing compact arrays, never Python objects."""

    def __init__(self, invalid_to_x: bool) -> None:
        self.invalid_to_x = invalid_to_x
        self.file_no, self.offset, self.span = array("i"), array("q"), array("q")
        self.length, self.line, self.hashes = array("q"), array("q"), array("q")
        self.ids, self.id_offsets = bytearray(), array("q", [0])

    def file(self, path: str, number: int, shown_as: str) -> None:
        """Scan one plain FASTA file."""
        record = None  # [header line, offset, end, residues, star_seen] of the open record
        position, line_no = 0, 0
        try:
            with open(path, "rb") as f:
                for raw in f:
                    line_no += 1
                    start, position = position, position + len(raw)
                    if raw.startswith(b">"):
                        self._close(record, shown_as)
                        self._header(raw, shown_as, line_no, number)
                        record = [line_no, position, position, 0, False]
                        continue
                    if not raw.strip(_WHITESPACE):
                        continue
                    if record is None:
                        raise VirnucError(
                            f"{shown_as}, line {line_no}: sequence data before the first '>' "
                            "header; is this a FASTA file?"
                        )
                    self._residues(raw, record, shown_as, line_no)
                    record[2] = start + len(raw.rstrip(_WHITESPACE))
        except OSError as error:
            raise VirnucError(f"cannot read {shown_as}: {error.strerror or error}") from None
        self._close(record, shown_as)

    def _header(self, raw: bytes, shown_as: str, line_no: int, number: int) -> None:
        try:
            header = raw[1:].decode("utf-8")
        except UnicodeDecodeError as error:
            raise VirnucError(
                f"{shown_as}, line {line_no}: header is not valid UTF-8 "
                f"(byte {raw[1 + error.start]:#x} at column {error.start + 2})"
            ) from None
        words = header.split()
        if not words:
            raise VirnucError(f"{shown_as}, line {line_no}: header has no id after '>'")
        ident = words[0].encode()
        self.ids += ident
        self.id_offsets.append(len(self.ids))
        self.hashes.append(hash(ident))
        self.file_no.append(number)
        self.line.append(line_no)

    def _residues(self, raw: bytes, record: list, shown_as: str, line_no: int) -> None:
        letters = raw.translate(None, _WHITESPACE)
        if record[4]:
            raise VirnucError(
                f"{shown_as}, line {line_no}: sequence {self._last_id()}: '*' inside the "
                f"sequence at position {record[3]}; only a final '*' is allowed"
                + ("" if self.invalid_to_x else " (or use --invalid-to-x to read it as X)")
            )
        if letters.endswith(b"*"):
            letters = letters[:-1]
            record[4] = True
        if not self.invalid_to_x:
            bad = letters.translate(None, _VALID)
            if bad:
                column = letters.index(bad[:1])
                shown = repr(bad[:1].decode("latin-1"))
                raise VirnucError(
                    f"{shown_as}, line {line_no}: sequence {self._last_id()}: letter {shown} at "
                    f"position {record[3] + column + 1} is not in ESM-2's alphabet; fix the "
                    "input or use --invalid-to-x to read such letters as X"
                )
        record[3] += len(letters)

    def _close(self, record: list | None, shown_as: str) -> None:
        if record is None:
            return
        header_line, offset, end, residues, _ = record
        if residues == 0:
            raise VirnucError(
                f"{shown_as}, line {header_line}: sequence {self._last_id()} is empty"
            )
        self.offset.append(offset)
        self.span.append(end - offset)
        self.length.append(residues)

    def _last_id(self) -> str:
        return self.ids[self.id_offsets[-2] : self.id_offsets[-1]].decode()


def _plain_copy(path: str, number: int, staging: str | Path | None) -> str:
    """Return a path to a plain (uncompressed) version of ``path``, decompressing gzip once."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as error:
        raise VirnucError(f"cannot read input {path}: {error.strerror or error}") from None
    if magic != _GZIP_MAGIC:
        return str(Path(path).resolve())
    if staging is None:
        raise VirnucError(f"{path} is gzip-compressed; a staging directory is needed to index it")
    target = Path(staging) / f"input-{number:04d}-{Path(path).name.removesuffix('.gz')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with gzip.open(path, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as error:
        partial.unlink(missing_ok=True)
        raise VirnucError(
            f"{path}: damaged gzip file ({error}); re-download or re-compress it"
        ) from None
    os.replace(partial, target)
    return str(target.resolve())


def _file_digest(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _check_duplicates(index: FastaIndex, hashes: np.ndarray, policy: str) -> None:
    """Find ids seen twice via their hashes (no set of strings), then refuse or suffix them."""
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    if not len(same):
        return
    candidates = np.unique(np.concatenate([order[same], order[same + 1]]))
    seen: dict[str, int] = {}
    duplicates: list[int] = []
    for row in sorted(candidates.tolist()):
        ident = index.id(row)
        if ident in seen:
            duplicates.append(row)
        seen.setdefault(ident, row)
    if not duplicates:
        return  # hash collisions of different ids
    if policy == "error":
        row = duplicates[0]
        first = seen[index.id(row)]
        raise VirnucError(
            f"duplicate id {index.id(row)!r}: {index.inputs[index.file[first]]} line "
            f"{index.line[first]} and {index.inputs[index.file[row]]} line {index.line[row]}; "
            "make ids unique or use --duplicate-ids suffix"
        )
    _suffix_duplicates(index, duplicates)


def _suffix_duplicates(index: FastaIndex, duplicates: list[int]) -> None:
    """Rename later occurrences of an id ``ID.2``, ``ID.3``, ... skipping names in use."""
    taken = set(index.ids())
    renamed: dict[int, bytes] = {}
    counts: dict[str, int] = {}
    for row in duplicates:
        ident = index.id(row)
        k = counts.get(ident, 1)
        while f"{ident}.{k + 1}" in taken:
            k += 1
        counts[ident] = k + 1
        name = f"{ident}.{k + 1}"
        taken.add(name)
        renamed[row] = name.encode()
    parts, offsets = [], [0]
    for row in range(len(index)):
        ident = (
            renamed.get(row)
            or index.id_bytes[index.id_offsets[row] : index.id_offsets[row + 1]].tobytes()
        )
        parts.append(ident)
        offsets.append(offsets[-1] + len(ident))
    index.id_bytes = np.frombuffer(b"".join(parts), dtype=np.uint8)
    index.id_offsets = np.array(offsets, dtype=np.int64)


def read_sequences(index: FastaIndex, rows: np.ndarray) -> list[bytes]:
    """Read the sequences of ``rows`` back from their files, upper-cased, ready to tokenise.

    Reads each file in offset order (one ``seek`` and ``read`` per sequence) and returns the
    sequences in the order of ``rows``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    out: list[bytes] = [b""] * len(rows)
    order = np.lexsort((index.offset[rows], index.file[rows]))
    with contextlib.ExitStack() as stack:
        handles: dict[int, BinaryIO] = {}
        for position in order.tolist():
            row = int(rows[position])
            number = int(index.file[row])
            if number not in handles:
                handles[number] = stack.enter_context(open(index.files[number], "rb"))
            handle = handles[number]
            handle.seek(int(index.offset[row]))
            data = handle.read(int(index.span[row])).translate(None, _WHITESPACE)
            if data.endswith(b"*"):
                data = data[:-1]
            if index.invalid_to_x:
                data = data.translate(_TO_X)
            out[position] = data.translate(_TO_UPPER)
            if len(out[position]) != index.length[row]:
                raise VirnucError(
                    f"{index.files[number]} changed since it was indexed: sequence "
                    f"{index.id(row)} has {len(out[position])} residues, not {index.length[row]}"
                )
    return out
