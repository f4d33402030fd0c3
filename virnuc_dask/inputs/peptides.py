"""The reads front end: reads in, an index of their peptides out, as the protein path builds.

:func:`build_peptide_index` reads each reads file once (FASTA or FASTQ, plain or gzip, a pipe
too), cuts long reads into pieces if asked (:mod:`~virnuc_dask.inputs.split`), translates
them in six frames (:mod:`~virnuc_dask.inputs.translate`) and writes the kept peptides, one a
line, into a staged file of the work directory. It returns a
:class:`~virnuc_dask.inputs.fasta.FastaIndex` over those files, exactly as the protein scan
returns over FASTA files, and the peptides'
:class:`~virnuc_dask.inputs.provenance.ReadProvenance`.

Decisions (``docs/decisions.md``):

- Translation runs here, in the index step on the driver, not per chunk on the workers. The
  driver must translate anyway: which frames are kept, and so the peptides' ids and lengths,
  are known only after translating, and the output file (its ids) and the partition (its
  lengths) are made before any chunk runs. Workers then read peptides like any protein input,
  with the same offsets, checksums and tokenizer: the engine does not know reads exist. The
  price is the staged file, about one byte per kept residue.
- Peptide ids are VirNucPro's: ``<read id><frame>``, ``<read id>_chunk_<k><frame>`` with
  ``split_bp``, and ``..._orf_<n>`` after the frame in ``orfs`` mode. A read id ends before
  the ``_chunk_``/frame/``_orf_`` suffix, so peptide ids are unique exactly when read ids are:
  read ids seen twice are refused (or renamed ``ID.2``, ..., with ``duplicate_ids="suffix"``).
- The peptides are in input order: by read, then piece, then frame ``F1`` .. ``R3``, then
  piece of the frame.
- A read without any kept frame is not an error; the run counts them and lists the first
  :data:`~virnuc_dask.inputs.provenance.LISTED_WITHOUT` ids, as the output names the reads
  (renamed ``ID.2``, ... with ``duplicate_ids="suffix"``: the list is made once the ids are
  checked). Inputs without a single peptide are an error (there would be nothing to embed).
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import zlib
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from virnuc_dask.cluster.hardware import usable_cpus
from virnuc_dask.errors import VirnucError, option
from virnuc_dask.inputs.duplicates import DUPLICATE_POLICIES, check_duplicates
from virnuc_dask.inputs.duplicates import id_bytes as read_id
from virnuc_dask.inputs.fasta import DIGEST_BYTES, FastaIndex
from virnuc_dask.inputs.provenance import LISTED_WITHOUT, ReadProvenance
from virnuc_dask.inputs.reads import ReadBatch, bad_base_message, offsets, ragged, read_batches
from virnuc_dask.inputs.split import split_starts
from virnuc_dask.inputs.staging import check_inputs, out_of_room, shown
from virnuc_dask.inputs.translate import (
    DEFAULT_MIN_ORF,
    FRAME_MODES,
    FRAMES,
    CodonLookup,
    InvalidBase,
    translate_frames,
)

#: The translations offered (``translate=``).
TRANSLATIONS = ("six-frame",)
#: Peptides whose ids are built at once (the gather holds a few index bytes per id byte).
_IDS_AT_ONCE = 1 << 18
#: Threads that translate batches (besides the one that parses them).
_THREADS = 3


@dataclass(frozen=True)
class Translation:
    """How reads become peptides.

    Parameters
    ----------
    genetic_code
        NCBI translation table number.
    frames
        ``"stop-free"``: keep a frame without any stop codon (VirNucPro's rule). ``"orfs"``:
        keep every stop-to-stop piece of a frame of at least ``min_peptide`` residues.
    min_peptide
        Shortest peptide kept; default 1 (every stop-free frame) for ``stop-free``,
        :data:`~virnuc_dask.inputs.translate.DEFAULT_MIN_ORF` for ``orfs``.
    split_bp
        Cut reads longer than this into pieces of this many bases first (None: no cutting).
    """

    genetic_code: int = 1
    frames: str = "stop-free"
    min_peptide: int | None = None
    split_bp: int | None = None

    @property
    def shortest(self) -> int:
        """The shortest peptide kept, with the default resolved."""
        if self.min_peptide is not None:
            return self.min_peptide
        return 1 if self.frames == "stop-free" else DEFAULT_MIN_ORF

    def validate(self) -> None:
        """Raise :class:`VirnucError` for a setting out of range."""
        CodonLookup.for_code(self.genetic_code)  # refuses an unknown table
        if self.frames not in FRAME_MODES:
            raise VirnucError(f"frames must be one of {', '.join(FRAME_MODES)}")
        if self.min_peptide is not None and self.min_peptide < 1:
            raise VirnucError(f"min peptide must be at least 1, got {self.min_peptide}")
        if self.split_bp is not None and self.split_bp < 3:
            raise VirnucError(f"split bp must be at least 3 (one codon), got {self.split_bp}")

    def settings(self) -> dict:
        """The settings as recorded in fingerprints and output attributes."""
        return {
            "translate": "six-frame",
            "genetic_code": self.genetic_code,
            "frames": self.frames,
            "min_peptide": self.shortest,
            "split_bp": self.split_bp,
        }


@dataclass
class _ReadTable:
    """Every read's id and place, as an id table for the duplicate check."""

    inputs: list[str]
    id_bytes: np.ndarray
    id_offsets: np.ndarray
    file: np.ndarray
    line: np.ndarray


def build_peptide_index(
    inputs: list[str | Path],
    staging: str | Path,
    translation: Translation | None = None,
    *,
    duplicate_ids: str = "error",
    storage=None,
) -> tuple[FastaIndex, ReadProvenance]:
    """Translate the reads of ``inputs`` and index the kept peptides.

    Parameters
    ----------
    inputs
        Reads files: FASTA or FASTQ, plain or gzip, DNA or RNA; pipes too.
    staging
        Folder for the staged peptide files (one per input), which workers read.
    translation
        How reads become peptides (default: standard code, stop-free frames).
    duplicate_ids
        ``"error"`` refuses a read id seen twice; ``"suffix"`` renames later occurrences
        ``ID.2``, ``ID.3``, ... before the frame is added.
    storage
        fsspec options (a :class:`~virnuc_dask.storage.urls.StorageOptions`) for inputs that are
        URLs; ``-`` reads standard input.

    Returns
    -------
    index, provenance
        The peptides' index (ids, lengths, offsets in the staged files) and where each
        peptide comes from.

    Raises
    ------
    VirnucError
        For every problem of the input, naming the file and the line or read; for inputs
        without any peptide.
    """
    translation = translation or Translation()
    translation.validate()
    if duplicate_ids not in DUPLICATE_POLICIES:
        raise VirnucError(f"duplicate_ids must be one of {DUPLICATE_POLICIES}")
    paths, _ = check_inputs(inputs, storage)
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    built = _Builder(translation, paths, storage)
    # SHA-256 of each file as stored: three times BLAKE2b's speed where the CPU has SHA
    # instructions, and reads files are large.
    digest = hashlib.sha256()
    files = []
    for number, path in enumerate(paths):
        target = staging / f"peptides-{number:04d}.txt"
        of_file = hashlib.sha256()
        built.file(path, number, target, of_file)
        digest.update(of_file.digest())
        files.append(str(target.resolve()))
    return built.finish(files, digest.hexdigest()[:32], duplicate_ids)


class _Column:
    """A growing array of one type: appended batch by batch, handed over without a copy."""

    def __init__(self, dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.data = bytearray()

    def append(self, values) -> None:
        self.data += np.ascontiguousarray(values, dtype=self.dtype).tobytes()

    def array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=self.dtype)


@dataclass
class _Translated:
    """One batch, translated (in a thread): everything but its place in the staged file."""

    peptides: object
    columns: dict[str, np.ndarray]
    ids: np.ndarray
    id_lengths: np.ndarray
    read_of: np.ndarray
    digests: bytes


#: The per-peptide columns and their types.
_COLUMNS = {
    "read": np.int64,
    "file": np.int32,
    "offset": np.int64,
    "length": np.int64,
    "checksum": np.uint32,
    "line": np.int64,
    "frame": np.int8,
    "nt_start": np.int64,
    "nt_end": np.int64,
    "read_bytes": np.int32,
}


class _Builder:
    """Peptides and reads gathered batch by batch, as compact growing arrays.

    Batches are translated by a few threads (numpy and ``bytes.translate`` release the GIL
    for most of the work) while the main thread parses the next ones, and collected in order.
    """

    def __init__(self, translation: Translation, paths: list[str], storage=None) -> None:
        self.translation = translation
        self.storage = storage
        self.lookup = CodonLookup.for_code(translation.genetic_code)
        self.paths = paths
        names = dict(_COLUMNS)
        if translation.split_bp:
            names.update(piece=np.int32, piece_start=np.int64)
        if translation.frames == "orfs":
            names.update(orf=np.int32)
        self.columns = {name: _Column(dtype) for name, dtype in names.items()}
        self.peptide_ids, self.peptide_id_lengths = bytearray(), _Column(np.int64)
        self.read_ids, self.read_id_lengths = bytearray(), _Column(np.int64)
        self.read_file, self.read_line = _Column(np.int32), _Column(np.int64)
        self.hashes = array("q")
        self.digests = bytearray()
        self.reads = 0
        self.without = 0
        self.first_without: list[int] = []  # rows of the reads table, named once ids are final

    def file(self, path: str, number: int, target: Path, digest) -> None:
        """Translate one reads file, writing its peptides to ``target``."""
        partial = target.with_name(target.name + ".partial")
        before = self.reads
        threads = max(1, min(_THREADS, usable_cpus() - 1))
        try:
            with open(partial, "wb") as out, ThreadPoolExecutor(threads) as pool:
                # Batches are translated in threads while the next ones are parsed here, and
                # collected in their order; a few at most are in flight.
                ahead: deque = deque()
                for batch in read_batches(path, digest, self.storage):
                    # In the caller's context: a message made in a thread spells options as
                    # the caller does (--translate on the command line, translate= in Python).
                    run = contextvars.copy_context().run
                    ahead.append((batch, pool.submit(run, self._translate, batch, number, path)))
                    if len(ahead) > threads:
                        self._collect(*ahead.popleft(), number, out)
                while ahead:
                    self._collect(*ahead.popleft(), number, out)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise out_of_room(
                f"cannot write {shown(partial)} to stage the peptides of input {shown(path)}", error
            ) from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, target)
        if self.reads == before:
            raise VirnucError(f"{shown(path)}: no reads in the file; leave it out of the inputs")

    def _translate(self, batch: ReadBatch, number: int, path: str) -> _Translated:
        """Cut, translate and name one batch's peptides (in a thread)."""
        t = self.translation
        n = len(batch)
        if t.split_bp:
            read, piece_start, piece = split_starts(batch.length, t.split_bp)
            start = batch.start[read] + piece_start
            length = np.minimum(batch.length[read], t.split_bp)
        else:
            read, piece_start, piece = np.arange(n), None, None
            start, length = batch.start, batch.length
        try:
            peptides = translate_frames(
                batch.seq, start, length, self.lookup, frames=t.frames, min_peptide=t.shortest
            )
        except InvalidBase as bad:
            at = bad.position + (int(piece_start[bad.sequence]) if t.split_bp else 0)
            message = bad_base_message(batch, int(read[bad.sequence]), at, bad.byte, shown(path))
            raise VirnucError(message) from None
        source = read[peptides.sequence]
        columns = {
            "read": source,
            "file": np.full(len(peptides), number, dtype=np.int32),
            "length": peptides.length,
            "checksum": _checksums(peptides),
            "line": batch.line[source],
            "frame": peptides.frame,
            "nt_start": peptides.nt_start,
            "nt_end": peptides.nt_end,
        }
        if t.split_bp:
            columns["piece"] = piece[peptides.sequence]
            columns["piece_start"] = piece_start[peptides.sequence]
        if t.frames == "orfs":
            columns["orf"] = peptides.orf
        ids, id_lengths, columns["read_bytes"] = _peptide_ids(
            batch.ids, batch.id_offsets, source, columns, t.frames == "orfs"
        )
        return _Translated(peptides, columns, ids, id_lengths, source, _digests(peptides))

    def _collect(self, batch: ReadBatch, future, number: int, out) -> None:
        """Stage one translated batch and append its rows (in the order of the batches)."""
        done: _Translated = future.result()
        n = len(batch)
        # Staged: the peptides' lines as they came; the rows point into them.
        position = out.tell()
        out.write(done.peptides.residues.tobytes())
        done.columns["offset"] = done.peptides.start + position
        done.columns["read"] = done.columns["read"] + self.reads
        for name, column in self.columns.items():
            column.append(done.columns[name])
        self.peptide_ids += done.ids.tobytes()
        self.digests += done.digests
        self.peptide_id_lengths.append(done.id_lengths)
        # The reads, for the duplicate check (and the ids, should a duplicate be renamed).
        self.read_ids += batch.ids.tobytes()
        self.read_id_lengths.append(np.diff(batch.id_offsets))
        self.read_file.append(np.full(n, number, dtype=np.int32))
        self.read_line.append(batch.line)
        self.hashes.extend(map(hash, batch.id_text.split(b"\n")))
        has = np.zeros(n, dtype=bool)
        has[done.read_of] = True
        missing = np.flatnonzero(~has)
        self.without += len(missing)
        for row in missing[: max(0, LISTED_WITHOUT - len(self.first_without))].tolist():
            self.first_without.append(self.reads + row)
        self.reads += n

    def finish(
        self, files: list[str], digest: str, duplicate_ids: str
    ) -> tuple[FastaIndex, ReadProvenance]:
        """Check the read ids and make the index."""
        reads = _ReadTable(
            inputs=self.paths,
            id_bytes=np.frombuffer(self.read_ids, dtype=np.uint8),
            id_offsets=offsets(self.read_id_lengths.array()),
            file=self.read_file.array(),
            line=self.read_line.array(),
        )
        before = reads.id_bytes
        paired = " (the mates of paired-end reads often share ids: give one file of each pair)"
        check_duplicates(
            reads, np.frombuffer(self.hashes, dtype=np.int64), duplicate_ids,
            what="read id", hint=paired,
        )  # fmt: skip
        col = {name: column.array() for name, column in self.columns.items()}
        if not len(col["length"]):
            raise VirnucError(
                f"no read of the {len(self.paths)} input(s) has a peptide to embed "
                f"({self.reads:,} reads, none with a kept frame); "
                + (
                    f"try {option('frames', 'orfs')} to embed the pieces between stop codons"
                    if self.translation.frames == "stop-free"
                    else f"try a smaller {option('min_peptide', 'N')}"
                )
            )
        if reads.id_bytes is before:
            id_bytes = np.frombuffer(self.peptide_ids, dtype=np.uint8)
            id_offsets = offsets(self.peptide_id_lengths.array())
        else:  # read ids were renamed (duplicate_ids="suffix"): name the peptides again
            id_bytes, id_lengths, col["read_bytes"] = _peptide_ids(
                reads.id_bytes, reads.id_offsets, col["read"], col, "orf" in col
            )
            id_offsets = offsets(id_lengths)
        index = FastaIndex(
            inputs=self.paths,
            files=files,
            file=col["file"],
            offset=col["offset"],
            span=col["length"],
            length=col["length"],
            line=col["line"],
            id_bytes=id_bytes,
            id_offsets=id_offsets,
            checksum=col["checksum"],
            digests=np.frombuffer(self.digests, dtype=np.uint8).reshape(-1, DIGEST_BYTES),
            digest=digest,
        )
        provenance = ReadProvenance(
            read_bytes=col["read_bytes"],
            frame=col["frame"],
            nt_start=col["nt_start"],
            nt_end=col["nt_end"],
            piece=col.get("piece"),
            piece_start=col.get("piece_start"),
            orf=col.get("orf"),
            reads=self.reads,
            without_peptides=self.without,
            first_without=[read_id(reads, row).decode() for row in self.first_without],
            settings=self.translation.settings(),
        )
        return index, provenance


def _peptide_ids(
    read_ids: np.ndarray, read_offsets: np.ndarray, read: np.ndarray, col: dict, orfs: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<read>[_chunk_<k>]<frame>[_orf_<n>]`` of peptides; no Python code per peptide.

    Returns the ids back to back, their lengths, and the bytes of each one's read id.
    """
    read_start = read_offsets[read]
    read_bytes = (read_offsets[read + 1] - read_start).astype(np.int32)
    parts = [(read_ids, read_start, read_bytes)]
    if "piece" in col:
        parts.append(_constant(b"_chunk_", len(read)))
        parts.append(_decimal(col["piece"]))
    frames = np.frombuffer("".join(FRAMES).encode(), dtype=np.uint8)
    parts.append((frames, col["frame"].astype(np.int64) * 2, np.full(len(read), 2)))
    if orfs:
        parts.append(_constant(b"_orf_", len(read)))
        parts.append(_decimal(col["orf"]))
    lengths = sum(np.asarray(size, dtype=np.int64) for _, _, size in parts)
    id_offsets = offsets(lengths)
    id_bytes = np.empty(int(id_offsets[-1]), dtype=np.uint8)
    sizes = [np.asarray(size) for _, _, size in parts]
    for first in range(0, len(read), _IDS_AT_ONCE):
        rows = slice(first, first + _IDS_AT_ONCE)
        # Each part's bytes for these peptides, then interleaved peptide by peptide.
        gathered = [ragged(buffer, starts[rows], size[rows]) for (buffer, starts, _), size
                    in zip(parts, sizes, strict=True)]  # fmt: skip
        _interleave(id_bytes, id_offsets, rows, gathered, sizes)
    return id_bytes, lengths, read_bytes


def _checksums(peptides) -> np.ndarray:
    """CRC-32 of each peptide's letters, as :func:`~virnuc_dask.inputs.fasta.read_sequences`
    checks them; no Python code runs per peptide."""
    blocks = peptides.blocks
    if blocks and sum(lines for _, lines, _ in blocks) == len(peptides):
        # Stop-free: blocks of equal-length lines, each line a peptide; CRC column by column.
        crcs = []
        for offset, lines, width in blocks:
            block = peptides.residues[offset : offset + lines * (width + 1)]
            crcs.append(_crc32_rows(block.reshape(lines, width + 1)[:, :width]))
        offset, lines, width = np.array(blocks, dtype=np.int64).T
        block = np.searchsorted(offset, peptides.start, side="right") - 1
        row = (peptides.start - offset[block]) // (width[block] + 1)
        return np.concatenate(crcs)[(np.cumsum(lines) - lines)[block] + row]
    return np.fromiter(map(zlib.crc32, _letters(peptides)), dtype=np.uint32, count=len(peptides))


def _digests(peptides) -> bytes:
    """The peptides' digests back to back (:func:`~virnuc_dask.inputs.fasta.sequence_digest`).

    The translated letters are upper case already, as a worker reads them back.
    """
    digest = hashlib.blake2b
    return b"".join(
        digest(piece, digest_size=DIGEST_BYTES).digest() for piece in _letters(peptides)
    )


def _letters(peptides):
    """Each peptide's letters (bytes), in order: what its CRC and its digest are taken of."""
    data = peptides.residues.tobytes()
    ends = (peptides.start + peptides.length).tolist()
    return map(data.__getitem__, map(slice, peptides.start.tolist(), ends))


def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1)
    return table.astype(np.uint32)


#: The CRC-32 table of zlib's polynomial, byte by byte.
_CRC_TABLE = _crc_table()


def _crc32_rows(rows: np.ndarray) -> np.ndarray:
    """``zlib.crc32`` of every row of a 2-D uint8 array, one column at a time.

    About twice as fast as one ``zlib.crc32`` call a row for peptide-sized rows, and numpy
    releases the GIL while it works, so translating threads run side by side.
    """
    columns = np.ascontiguousarray(rows.T)
    crc = np.full(rows.shape[0], 0xFFFFFFFF, dtype=np.uint32)
    index = np.empty(rows.shape[0], dtype=np.intp)
    for column in columns:
        np.bitwise_xor(crc, column, out=index, casting="unsafe")
        np.bitwise_and(index, 0xFF, out=index)
        crc >>= 8
        crc ^= _CRC_TABLE[index]
    return crc ^ np.uint32(0xFFFFFFFF)


def _constant(text: bytes, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A part that is the same bytes for every peptide."""
    return (
        np.frombuffer(text, dtype=np.uint8),
        np.zeros(count, dtype=np.int64),
        np.full(count, len(text), dtype=np.int64),
    )


def _decimal(numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A part that is each number written in decimal."""
    numbers = np.asarray(numbers, dtype=np.int64)
    top = int(numbers.max()) if len(numbers) else 0
    written = [str(k).encode() for k in range(top + 1)]
    table = np.frombuffer(b"".join(written), dtype=np.uint8)
    sizes = np.array([len(w) for w in written], dtype=np.int64)
    starts = offsets(sizes)[:-1]
    return table, starts[numbers], sizes[numbers]


def _interleave(out, out_offsets, rows: slice, gathered, sizes) -> None:
    """Write the parts of peptides ``rows`` into ``out``, one peptide's parts after another."""
    count = len(out_offsets) - 1
    first, stop = rows.start, min(rows.stop, count)
    skip = np.zeros(stop - first, dtype=np.int64)
    for part, size in zip(gathered, sizes, strict=True):
        size = size[first:stop].astype(np.int64)
        # Where this part of each peptide goes: its id's start plus the parts before it.
        place = out_offsets[first:stop] + skip
        within = np.arange(int(size.sum()), dtype=np.int64) - np.repeat(
            np.cumsum(size) - size, size
        )
        out[np.repeat(place, size) + within] = part
        skip += size
