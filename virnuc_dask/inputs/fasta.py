"""FASTA of proteins: one scan of the inputs into numpy arrays, and reading sequences back.

The scan validates every record (so a bad letter stops the run before any cluster starts, with
the file, line and id in the message) and keeps, per sequence, the byte range of its residue
lines in a plain file. Workers later read exactly their own sequences with one ``seek`` each;
the Dask graph only ever carries row numbers.

Decisions (``docs/input.md`` lists every accepted and refused input with its message):

- The id is the first word of the header (words are separated by ASCII whitespace); it must be
  UTF-8 without control characters, and at most ``MAX_ID_BYTES`` long. The rest of the header is
  ignored, whatever its encoding.
- Upper and lower case are the same residue; whitespace inside sequence lines (spaces, tabs,
  CR of CRLF files) is ignored; blank lines between records are accepted; a UTF-8 byte-order
  mark at the start of a file is skipped.
- A ``*`` at the very end of a record (a stop codon) is dropped; anywhere else it is an error.
- ``.`` and ``-`` are letters of fair-esm's alphabet and are accepted as such.
- Any other byte is an error naming the sequence and position, unless ``invalid_to_x`` is set,
  which reads it as ``X`` (an inner ``*`` included).
- Lines that would silently corrupt a record under ``invalid_to_x`` are refused in every mode:
  ``;`` comment lines, indented ``>`` headers, and CR-only (classic Mac) line breaks.
- A file without any record, an empty record, an id seen twice (unless ``duplicate_ids`` is
  ``"suffix"``) and the same file given twice are errors.
- A file of nucleotides (DNA or RNA: the rule is in :mod:`~virnuc_dask.inputs.nucleotide`) is
  refused with the option that translates it, and the one that reads it as proteins all the
  same (``as_protein``, for a protein made only of nucleotide letters); so is a FASTQ file
  (its first line starts with ``@``). All their letters are in ESM-2's alphabet: embedded as
  they are, they would give embeddings of meaningless "proteins" without any warning.
- gzip inputs (recognised by their magic bytes, not their name) are decompressed once into the
  staging directory during the scan, so that workers can seek in them; so are inputs that
  cannot seek (pipes such as ``<(zcat a.fa.gz)``). Other compressions are refused by name
  (:mod:`~virnuc_dask.inputs.staging`).
- Inputs must not change during a run: workers read them long after the scan. The scan keeps a
  CRC-32 of each sequence's bytes as a worker will read them (4 bytes a sequence), and
  :func:`read_sequences` refuses bytes that differ, so an edit, even one that keeps every
  length, stops the run instead of mixing old and new sequences in one output.
- An input is hashed as it is scanned, in one read (for a URL, one download). Workers read
  their sequences with :meth:`~virnuc_dask.storage.places.Place.read_ranges` of the file's
  place: one ``seek`` a sequence in a local file, byte ranges of a URL
  (:func:`~virnuc_dask.storage.reading.read_ranges`), nearby ranges merged into one request.
  A local file and a URL go through the same code (:mod:`~virnuc_dask.storage.places`).
"""

from __future__ import annotations

import hashlib
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from virnuc_dask.errors import VirnucError, option
from virnuc_dask.inputs.duplicates import DUPLICATE_POLICIES, check_duplicates
from virnuc_dask.inputs.duplicates import shown_id as _shown_id
from virnuc_dask.inputs.nucleotide import (
    SAMPLE_LETTERS,
    letter_counts,
    looks_like_nucleotides,
    sample_letters,
)
from virnuc_dask.inputs.staging import check_inputs, plain_copy, unreadable
from virnuc_dask.inputs.staging import shown as _shown
from virnuc_dask.model.tokens import RESIDUE_LETTERS
from virnuc_dask.storage.remote import place
from virnuc_dask.storage.urls import StorageOptions

_WHITESPACE = b" \t\r\n\v\f"


_VALID = RESIDUE_LETTERS + RESIDUE_LETTERS.lower() + _WHITESPACE


_TO_UPPER = bytes.maketrans(RESIDUE_LETTERS.lower(), RESIDUE_LETTERS)


# Every byte that is neither whitespace nor a residue letter becomes X (for invalid_to_x).
_TO_X = bytes.maketrans(
    bytes(b for b in range(256) if b not in _VALID), b"X" * (256 - len(set(_VALID)))
)


_CONTROL = bytes(range(32)) + b"\x7f"


_UTF8_BOM = b"\xef\xbb\xbf"


_SHOWN = 60  # characters of an overlong id quoted in a message


#: The longest id accepted, in UTF-8 bytes. Ids become the output's coordinate, which every
#: reader loads whole when it opens the file: one 1 MB id made opening the output extremely
#: expensive. Real ids (accessions, even ``sp|P12345|NAME_SPECIES/1-100``) are far shorter.
MAX_ID_BYTES = 1000


__all__ = [
    "DIGEST_BYTES",
    "DUPLICATE_POLICIES",
    "MAX_ID_BYTES",
    "FastaIndex",
    "build_index",
    "sequence_digest",
]


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
    checksum
        Per sequence, ``zlib.crc32`` (uint32) of the ``span`` bytes at ``offset``: what
        :func:`read_sequences` reads, checked there so that a changed input is refused.
    digests
        Per sequence, the 16-byte BLAKE2b digest (uint8, shape ``(n, 16)``) of the sequence as
        the model sees it (:func:`sequence_digest`): equal digests are equal sequences, which
        a run embeds once (:mod:`~virnuc_dask.plan.distinct`).
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
    checksum: np.ndarray
    digests: np.ndarray
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

    _ARRAYS = (
        "file",
        "offset",
        "span",
        "length",
        "line",
        "id_bytes",
        "id_offsets",
        "checksum",
        "digests",
    )

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
        """Open an index written by :meth:`save`, its arrays memory-mapped read-only.

        Raises
        ------
        VirnucError
            If the index lacks an array, as one saved by an older version does.
        """
        import json

        directory = Path(directory)
        if (directory / "index.json").is_file() and not (directory / "checksum.npy").is_file():
            # Saved by a client on an older version than this worker; reading on without
            # checksums would silently drop the check that the inputs did not change.
            raise VirnucError(
                f"index {_shown(directory)} has no per-sequence checksums: it was saved by an "
                "older virnuc-dask; run the client and every worker on the same version"
            )
        meta = json.loads((directory / "index.json").read_text())
        arrays = {n: np.load(directory / f"{n}.npy", mmap_mode="r") for n in cls._ARRAYS}
        return cls(**meta, **arrays)


def build_index(
    inputs: list[str | Path],
    staging: str | Path | None = None,
    *,
    invalid_to_x: bool = False,
    duplicate_ids: str = "error",
    storage: StorageOptions | None = None,
    as_protein: bool = False,
) -> FastaIndex:
    """Scan FASTA files (plain or gzip) into a :class:`FastaIndex`, validating every record.

    Parameters
    ----------
    inputs
        FASTA files, plain or gzip-compressed, multi-line records, any line endings. Pipes
        (``-`` for standard input, ``<(zcat a.fa.gz)``) are accepted and copied into
        ``staging``; fsspec URLs are read where they are.
    staging
        Directory for plain copies of gzip inputs and pipes; required when there is one.
    invalid_to_x
        Read letters outside fair-esm's alphabet as ``X`` instead of refusing them.
    duplicate_ids
        ``"error"`` refuses an id seen twice; ``"suffix"`` keeps both, renaming later
        occurrences ``ID.2``, ``ID.3``, ... (skipping names already in use).
    storage
        fsspec options for inputs that are URLs.
    as_protein
        Read the inputs as proteins even when their letters are those of nucleotides (a
        protein made only of nucleotide letters); else such a file is refused.

    Raises
    ------
    VirnucError
        For every problem of the input, naming the file and the line or id.
    """
    if duplicate_ids not in DUPLICATE_POLICIES:
        raise VirnucError(f"duplicate_ids must be one of {DUPLICATE_POLICIES}")
    # Check that every input exists before the first long scan.
    paths, infos = check_inputs(inputs, storage)
    scan = _Scan(invalid_to_x, as_protein)
    files, digest = [], hashlib.blake2b(digest_size=16)
    for number, (path, info) in enumerate(zip(paths, infos, strict=True)):
        plain = plain_copy(path, info, number, staging, storage)
        # Hashed as it is scanned: one read of the file (one download of a URL).
        of_file = hashlib.blake2b(digest_size=16)
        scan.file(plain, number, shown_as=path, storage=storage, digest=of_file)
        digest.update(of_file.hexdigest().encode())
        files.append(plain)
    # The arrays share the scan's buffers: nothing is copied at the end of the scan.
    index = FastaIndex(
        inputs=paths,
        files=files,
        file=np.frombuffer(scan.file_no, dtype=np.int32),
        offset=np.frombuffer(scan.offset, dtype=np.int64),
        span=np.frombuffer(scan.span, dtype=np.int64),
        length=np.frombuffer(scan.length, dtype=np.int64),
        line=np.frombuffer(scan.line, dtype=np.int64),
        id_bytes=np.frombuffer(scan.ids, dtype=np.uint8),
        id_offsets=np.frombuffer(scan.id_offsets, dtype=np.int64),
        checksum=np.frombuffer(scan.checksum, dtype=np.uint32),
        digests=np.frombuffer(scan.digests, dtype=np.uint8).reshape(-1, DIGEST_BYTES),
        digest=digest.hexdigest(),
        invalid_to_x=invalid_to_x,
    )
    check_duplicates(index, np.frombuffer(scan.hashes, dtype=np.int64), duplicate_ids)
    return index


class _Scan:
    """The state of one pass over the inputs: growing compact arrays, never Python objects."""

    def __init__(self, invalid_to_x: bool, as_protein: bool = False) -> None:
        self.invalid_to_x = invalid_to_x
        self.as_protein = as_protein
        self.file_no, self.offset, self.span = array("i"), array("q"), array("q")
        self.length, self.line, self.hashes = array("q"), array("q"), array("q")
        self.checksum = array("I")
        self.digests = bytearray()
        self.ids, self.id_offsets = bytearray(), array("q", [0])
        self.sample = bytearray()  # the first letters of the file, N and X left out

    def file(
        self,
        path: str,
        number: int,
        shown_as: str,
        storage: StorageOptions | None = None,
        digest=None,
    ) -> None:
        """Scan one plain FASTA file (or URL); ``digest`` is updated with its bytes if given."""
        shown = _shown(shown_as)
        before = len(self.line)
        self.sample.clear()
        # The open record: [header line, offset, end, residues, line of a '*' that ended a
        # line and so may be the final one (0: none), its letters line by line (the digest)].
        record = None
        position, line_no = 0, 0
        # The record's checksum is carried over whole lines, one zlib call each (zlib resumes
        # from a value): `crc` covers its bytes up to the end of the line just read, and `base`
        # them up to its last residue line, `last` (that line without its line end, where the
        # span stops). The checksum is crc32(last, base), taken when the record closes.
        crc = base = 0
        last = b""
        try:
            with place(path, storage).open_read(digest=digest) as f:
                for raw in f:
                    line_no += 1
                    start, position = position, position + len(raw)
                    if line_no == 1 and raw.startswith(_UTF8_BOM):
                        raw, start = raw[len(_UTF8_BOM) :], start + len(_UTF8_BOM)
                    head = raw[:1]
                    if head == b">":
                        self._close(record, shown, zlib.crc32(last, base))
                        self._header(raw, shown, line_no, number)
                        record = [line_no, position, position, 0, 0, []]
                        crc = base = 0
                        last = b""
                        continue
                    body = raw.rstrip(_WHITESPACE)
                    if not body:
                        crc = zlib.crc32(raw, crc)
                        continue
                    if record is None or head in b"; \t\v\f" or b"\r" in body:
                        _odd_line(body, record is None, shown, line_no)
                    self._residues(body, record, shown, line_no)
                    record[2] = start + len(body)
                    base, last = crc, body
                    crc = zlib.crc32(raw, crc)
        except OSError as error:
            raise VirnucError(unreadable(shown_as, error)) from None
        self._close(record, shown, zlib.crc32(last, base))
        if len(self.line) == before:
            if line_no == 0:
                raise VirnucError(
                    f"{shown}: the file is empty; a FASTA file has '>id' header lines, each "
                    "followed by residue lines (leave empty files out of the inputs)"
                )
            raise VirnucError(
                f"{shown}: no '>' header in its {line_no} blank line(s); is this a FASTA file?"
            )
        if len(self.sample) < SAMPLE_LETTERS and not self.as_protein:
            self._refuse_nucleotides(shown)

    def _header(self, raw: bytes, shown: str, line_no: int, number: int) -> None:
        text = raw[1:].rstrip(_WHITESPACE)
        if b"\r" in text:
            raise VirnucError(_lone_cr(shown, line_no))
        words = text.split(None, 1)
        if not words:
            raise VirnucError(
                f"{shown}, line {line_no}: header has no id after '>'; give every record an id "
                "('>id description')"
            )
        ident = words[0]
        column = raw.index(ident) + 1  # 1-based column of the id in the line
        try:
            text = ident.decode("utf-8")
        except UnicodeDecodeError as error:
            raise VirnucError(
                f"{shown}, line {line_no}: id is not valid UTF-8 (byte {ident[error.start]:#04x} "
                f"at column {column + error.start}); write ids in ASCII or UTF-8"
            ) from None
        if len(ident.translate(None, _CONTROL)) != len(ident):
            at = next(i for i, b in enumerate(ident) if b in _CONTROL)
            raise VirnucError(
                f"{shown}, line {line_no}: id contains the control character {ident[at]:#04x} "
                f"at column {column + at}; remove it from the header"
            )
        if len(ident) > MAX_ID_BYTES:
            raise VirnucError(
                f"{shown}, line {line_no}: id '{text[:_SHOWN]}...' is {len(ident)} bytes long "
                f"(UTF-8), over the limit of {MAX_ID_BYTES}; shorten the header's first word "
                "(after a space, the rest of the header is a description of any length)"
            )
        self.ids += ident
        self.id_offsets.append(len(self.ids))
        self.hashes.append(hash(ident))
        self.file_no.append(number)
        self.line.append(line_no)

    def _residues(self, body: bytes, record: list, shown: str, line_no: int) -> None:
        letters = body.translate(None, _WHITESPACE)
        if len(self.sample) < SAMPLE_LETTERS and not self.as_protein:
            self.sample += sample_letters(letters)
            if len(self.sample) >= SAMPLE_LETTERS:  # decide now, not after a long file
                self._refuse_nucleotides(shown)
        if record[4]:
            # A '*' ended an earlier line, so it was not the record's last letter.
            if not self.invalid_to_x:
                raise VirnucError(
                    f"{shown}, line {record[4]}: sequence {self._last_id()}: '*' inside the "
                    f"sequence at position {record[3] + 1}; only a final '*' is allowed (or use "
                    "--invalid-to-x to read it as X)"
                )
            record[3] += 1
            record[4] = 0
            record[5].append(b"X")  # read as X, as read_sequences reads it
        if letters[-1:] == b"*":
            letters = letters[:-1]
            record[4] = line_no
        record[5].append(letters)
        if not self.invalid_to_x:
            bad = letters.translate(None, _VALID)
            if bad:
                position = record[3] + letters.index(bad[:1]) + 1
                if bad[:1] == b"*":
                    raise VirnucError(
                        f"{shown}, line {line_no}: sequence {self._last_id()}: '*' inside the "
                        f"sequence at position {position}; only a final '*' is allowed (or use "
                        "--invalid-to-x to read it as X)"
                    )
                byte = bad[0]
                what = f"letter '{chr(byte)}'" if 0x21 <= byte < 0x7F else f"byte {byte:#04x}"
                raise VirnucError(
                    f"{shown}, line {line_no}: sequence {self._last_id()}: {what} "
                    f"at position {position} is not in ESM-2's alphabet; fix the input or use "
                    "--invalid-to-x to read such letters as X"
                )
        record[3] += len(letters)

    def _refuse_nucleotides(self, shown: str) -> None:
        share = looks_like_nucleotides(letter_counts(self.sample[:SAMPLE_LETTERS]))
        if share is not None:
            raise VirnucError(
                f"{shown} holds nucleotide sequences, not proteins ({share:.0%} of its letters "
                "other than N and X are A, C, G, T, U or IUPAC codes); to embed the peptides of "
                f"its reads, use {option('translate', 'six-frame')}, or "
                f"{option('as_protein')} for proteins made only of these letters"
            )

    def _close(self, record: list | None, shown: str, checksum: int) -> None:
        if record is None:
            return
        header_line, offset, end, residues, _, letters = record
        if residues == 0:
            raise VirnucError(
                f"{shown}, line {header_line}: sequence {self._last_id()} is empty (no residues "
                "after its header); remove the record or add its sequence"
            )
        self.offset.append(offset)
        self.span.append(end - offset)
        self.length.append(residues)
        self.checksum.append(checksum)
        self.digests += sequence_digest(b"".join(letters), self.invalid_to_x)

    def _last_id(self) -> str:
        return _shown_id(self.ids[self.id_offsets[-2] : self.id_offsets[-1]].decode())


#: Bytes of a sequence's digest (BLAKE2b-128).
DIGEST_BYTES = 16


def sequence_digest(letters: bytes, invalid_to_x: bool = False) -> bytes:
    """The digest of a sequence as the model sees it: BLAKE2b-128 of its normalised letters.

    ``letters``: the residue letters without whitespace and without the final ``*``;
    normalised as :func:`~virnuc_dask.inputs.sequences.read_sequences` normalises them (upper
    case; with ``invalid_to_x``, letters outside the alphabet as ``X``), so two sequences that
    differ only in case have one digest.
    """
    if invalid_to_x:
        letters = letters.translate(_TO_X)
    return hashlib.blake2b(letters.translate(_TO_UPPER), digest_size=DIGEST_BYTES).digest()


def _odd_line(body: bytes, before_header: bool, shown: str, line_no: int) -> None:
    """Refuse a residue line that is not one (rare); return for an indented residue line."""
    first = body.lstrip(_WHITESPACE)[:1]
    if first == b";":
        raise VirnucError(
            f"{shown}, line {line_no}: ';' comment lines are not read; remove them "
            "(grep -v '^;' FILE)"
        )
    if first == b">":
        raise VirnucError(
            f"{shown}, line {line_no}: whitespace before the '>' of a header; a header must "
            "start at the beginning of its line"
        )
    if b"\r" in body:
        raise VirnucError(_lone_cr(shown, line_no))
    if before_header and first == b"@":
        raise VirnucError(
            f"{shown}, line {line_no}: this looks like a FASTQ file of reads, not FASTA of "
            f"proteins; to embed the peptides of its reads, use {option('translate', 'six-frame')}"
        )
    if before_header:
        raise VirnucError(
            f"{shown}, line {line_no}: sequence data before the first '>' header; is this a "
            "FASTA file?"
        )


def _lone_cr(shown: str, line_no: int) -> str:
    return (
        f"{shown}, line {line_no}: a carriage return (CR) inside the line: the file uses "
        "classic Mac line breaks; convert them to LF (tr '\\r' '\\n' < FILE > NEW)"
    )
