"""A corpus of malformed and unusual FASTA inputs, one row per case, with the expected behaviour.

Each :class:`Case` builds its file(s) in a folder and says what must happen: ``error`` (the
message must contain ``message``, name the file(s) in ``named`` and, where the problem has one,
the line or id in ``where``) or ``accept`` (the index must hold exactly ``records``, as
``(id, sequence)`` pairs, sequences as the model will read them). ``docs/input.md`` mirrors this
table; ``tests/test_input_corpus.py`` runs it.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from virnuc_dask.inputs.fasta import MAX_ID_BYTES


@dataclass(frozen=True)
class Built:
    """What a case's builder made: the inputs to give, and the paths the message must name."""

    inputs: list[str]
    named: list[str]
    output: str | None = None  # the output path to ask for, when the case is about it


@dataclass(frozen=True)
class Case:
    """One corpus row. ``options`` are :func:`~virnuc_dask.inputs.build_index` keywords."""

    name: str
    build: Callable[[Path], Built]
    expect: str  # "error" or "accept"
    message: str = ""
    where: str = ""
    records: tuple[tuple[str, bytes], ...] = ()
    options: dict = field(default_factory=dict)
    unprivileged: bool = False  # needs a user that file permissions apply to

    def cli_flags(self) -> list[str]:
        """The command-line flags for ``options``."""
        flags = []
        if self.options.get("invalid_to_x"):
            flags.append("--invalid-to-x")
        if "duplicate_ids" in self.options:
            flags += ["--duplicate-ids", self.options["duplicate_ids"]]
        if self.options.get("as_protein"):
            flags.append("--as-protein")
        if "translate" in self.options:
            flags += ["--translate", self.options["translate"]]
        return flags


# ---------------------------------------------------------------------------------------------
# Builders


def _write(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def one(data: bytes, name: str = "input.fa") -> Callable[[Path], Built]:
    """A builder of one file holding ``data``."""

    def build(folder: Path) -> Built:
        path = _write(folder, name, data)
        return Built([path], [path])

    return build


def several(*files: tuple[str, bytes], named: tuple[int, ...] = (-1,)) -> Callable[[Path], Built]:
    """A builder of several files, given in order; the message must name files ``named``."""

    def build(folder: Path) -> Built:
        paths = [_write(folder, name, data) for name, data in files]
        return Built(paths, [paths[i] for i in named])

    return build


def _gzip_bad_crc(data: bytes) -> bytes:
    packed = bytearray(gzip.compress(data, mtime=0))
    packed[-8] ^= 0xFF  # the CRC32 of the trailer
    return bytes(packed)


def _gzip_bad_deflate(data: bytes) -> bytes:
    packed = bytearray(gzip.compress(data, mtime=0))
    packed[10] = 0xFF  # first deflate block header: reserved block type 3
    return bytes(packed)


def _zip(data: bytes) -> bytes:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("input.fa", data)
    return buffer.getvalue()


def _directory(folder: Path) -> Built:
    path = folder / "proteins"
    path.mkdir()
    (path / "a.fa").write_bytes(b">a\nMK\n")
    return Built([str(path)], [str(path)])


def _missing(folder: Path) -> Built:
    path = str(folder / "missing.fa")
    return Built([path], [path])


def _broken_link(folder: Path) -> Built:
    path = folder / "link.fa"
    path.symlink_to(folder / "gone.fa")
    return Built([str(path)], [str(path)])


def _link_loop(folder: Path) -> Built:
    a, b = folder / "a.fa", folder / "b.fa"
    a.symlink_to(b)
    b.symlink_to(a)
    return Built([str(a)], [str(a)])


def _device(folder: Path) -> Built:
    path = folder / "null.fa"
    path.symlink_to(os.devnull)
    return Built([str(path)], [str(path)])


def _link_to_file(folder: Path) -> Built:
    target = _write(folder, "real.fa", b">a\nMK\n")
    link = folder / "link.fa"
    link.symlink_to(target)
    return Built([str(link)], [str(link)])


def _same_file_twice(folder: Path) -> Built:
    path = _write(folder, "a.fa", b">a\nMK\n")
    link = folder / "again.fa"
    link.symlink_to(path)
    return Built([path, str(link)], [path, str(link)])


def _unreadable(folder: Path) -> Built:
    path = _write(folder, "secret.fa", b">a\nMK\n")
    os.chmod(path, 0)
    return Built([path], [path])


def _missing_output_folder(folder: Path) -> Built:
    path = _write(folder, "input.fa", b">a\nMK\n")
    missing = folder / "no-such-folder"
    return Built([path], [str(missing)], output=str(missing / "out.h5"))


def _fifo(data: bytes) -> Callable[[Path], Built]:
    """A named pipe that a thread fills once a reader opens it (like ``<(zcat a.fa.gz)``)."""

    def build(folder: Path) -> Built:
        path = folder / "pipe.fa"
        os.mkfifo(path)

        def feed() -> None:
            with open(path, "wb") as pipe:
                pipe.write(data)

        threading.Thread(target=feed, daemon=True).start()
        return Built([str(path)], [str(path)])

    return build


# ---------------------------------------------------------------------------------------------
# Data

_RNG = np.random.default_rng(20260701)
_AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)


def _protein(n: int) -> bytes:
    return _AMINO[_RNG.integers(0, len(_AMINO), n)].tobytes()


def _lines(sequence: bytes, width: int = 60) -> bytes:
    return b"".join(sequence[i : i + width] + b"\n" for i in range(0, len(sequence), width))


LONG = _protein(100_000)
#: A type I antifreeze protein: alanine, threonine and asparagine, as DNA is A, T and N.
AFP = b"DTASDAAAAAALTAANAKAAAELTAANAAAAAAATAR"
#: Scaffolds: runs of N (85% of the letters) between stretches of bases.
SCAFFOLD = (b"N" * 170 + b"ACGTTGCAAGGCTTAACGATCGATTACAGG") * 8
#: A consensus with IUPAC ambiguity codes (R, Y, K, M, S, W: 15% of the letters).
CONSENSUS = b"ACGTRACGGTYACTTGKACMGATSAGCWTTGACAGTAACG" * 8
#: A metallothionein: a third cysteine, with serine, lysine, alanine, glycine and threonine.
METALLOTHIONEIN = b"MDPNCSCAAGDSCTCAGSCKCKECKCTSCKKSCCSCCPVGCAKCSQGCICKEASDKCSCCA"
#: Real proteins (UniRef50): the example file.
PROTEINS = Path(__file__).resolve().parents[1] / "examples" / "data" / "some_proteins.fasta"
PROTEINS = PROTEINS.read_bytes()
MB_DESCRIPTION = b"x" * (1 << 20)
MB_ID = b"P" * (1 << 20)
ID_AT_LIMIT = b"P" * MAX_ID_BYTES
ALPHABET = b"LAGVSERTIDPKQNFYMHWCXBUZO.-"


# ---------------------------------------------------------------------------------------------
# The corpus

CASES: list[Case] = [
    # --- whole files that hold no record -----------------------------------------------------
    Case("empty_file", one(b""), "error", "the file is empty"),
    Case("blank_lines_only", one(b"\n \n\t\r\n"), "error", "no '>' header in its 3 blank"),
    Case("gzip_of_empty_file", one(gzip.compress(b""), "input.fa.gz"), "error", "file is empty"),
    Case("only_headers", one(b">a\n>b\n"), "error", "sequence a is empty", "line 1"),
    Case("no_header", one(b"MKVL\nMKVL\n"), "error", "before the first '>' header", "line 1"),
    Case(
        "data_before_first_header",
        one(b"\nMKVL\n>a\nMK\n"),
        "error",
        "before the first '>' header",
        "line 2",
    ),
    # --- records -------------------------------------------------------------------------------
    Case(
        "empty_sequence_middle",
        one(b">a\nMK\n>b\n>c\nMK\n"),
        "error",
        "sequence b is empty",
        "line 3",
    ),
    Case("empty_sequence_last", one(b">a\nMK\n>b\n"), "error", "sequence b is empty", "line 3"),
    Case(
        "last_header_without_newline",
        one(b">a\nMK\n>b"),
        "error",
        "sequence b is empty",
        "line 3",
    ),
    Case(
        "sequence_of_blank_lines",
        one(b">a\n  \n\t\n>b\nMK\n"),
        "error",
        "sequence a is empty",
        "line 1",
    ),
    Case("sequence_only_star", one(b">a\n*\n>b\nMK\n"), "error", "sequence a is empty", "line 1"),
    Case("header_without_id", one(b">\nMK\n"), "error", "header has no id", "line 1"),
    Case("header_of_spaces", one(b">a\nM\n>  \t\nMK\n"), "error", "header has no id", "line 3"),
    Case(
        "duplicate_ids",
        one(b">a x\nMK\n>b\nM\n>a y\nL\n"),
        "error",
        "duplicate id 'a'",
        "line 5",
    ),
    Case(
        "duplicate_ids_across_files",
        several(("one.fa", b">a\nMK\n"), ("two.fa", b">b\nM\n>a\nL\n"), named=(0, 1)),
        "error",
        "duplicate id 'a'",
        "line 3",
    ),
    Case(
        "duplicate_ids_suffix",
        one(b">a\nMK\n>a\nM\n>a.2\nL\n>a\nW\n"),
        "accept",
        records=(("a", b"MK"), ("a.3", b"M"), ("a.2", b"L"), ("a.4", b"W")),
        options={"duplicate_ids": "suffix"},
    ),
    Case(
        "ids_differing_in_case",
        one(b">abc\nMK\n>ABC\nM\n>Abc\nL\n"),
        "accept",
        records=(("abc", b"MK"), ("ABC", b"M"), ("Abc", b"L")),
    ),
    Case(
        "id_with_slash_and_spaces",
        one(b">sp|P12345|X_HUMAN/1-100 a  description\twith tabs / slashes\nMKVL\n"),
        "accept",
        records=(("sp|P12345|X_HUMAN/1-100", b"MKVL"),),
    ),
    Case("space_after_gt", one(b"> a description\nMK\n"), "accept", records=(("a", b"MK"),)),
    Case(
        "utf8_id",
        one(">β-lactamase\nMK\n".encode()),
        "accept",
        records=(("β-lactamase", b"MK"),),
    ),
    Case(
        "non_utf8_in_id",
        one(b">a\nM\n>b\xff\nMK\n"),
        "error",
        "id is not valid UTF-8 (byte 0xff at column 3)",
        "line 3",
    ),
    Case(
        "non_utf8_in_description",
        one(b">a d\xe9scription in Latin-1\nMK\n"),
        "accept",
        records=(("a", b"MK"),),
    ),
    Case(
        "control_character_in_id",
        one(b">a\x00b\nMK\n"),
        "error",
        "control character 0x00 at column 3",
        "line 1",
    ),
    Case(
        "header_1mb",
        one(b">a " + MB_DESCRIPTION + b"\nMKVL\n"),
        "accept",
        records=(("a", b"MKVL"),),
    ),
    Case(
        "id_at_limit",
        one(b">" + ID_AT_LIMIT + b" d\nMKVL\n"),
        "accept",
        records=((ID_AT_LIMIT.decode(), b"MKVL"),),
    ),
    Case(
        "id_1mb",
        one(b">a\nM\n>" + MB_ID + b"\nMKVL\n"),
        "error",
        f"id '{'P' * 60}...' is {1 << 20} bytes long (UTF-8), over the limit of {MAX_ID_BYTES}; "
        "shorten the header's first word",
        "line 3",
    ),
    Case(
        "id_over_limit_in_utf8_bytes",  # fewer characters than the limit, more bytes
        one((">" + "β" * (MAX_ID_BYTES // 2 + 1) + "\nMK\n").encode()),
        "error",
        f"is {MAX_ID_BYTES + 2} bytes long (UTF-8), over the limit of {MAX_ID_BYTES}",
        "line 1",
    ),
    Case(
        "id_at_limit_with_bad_letter",
        one(b">" + ID_AT_LIMIT + b"\nMKJL\n"),
        "error",
        "letter 'J' at position 3",
        "PPPPPPPPPP...",  # the message shortens the id, so it stays one readable line
    ),
    # --- residues ------------------------------------------------------------------------------
    Case(
        "multi_line_records",
        one(b">a\nMKV\nLLA\nG\n>b desc\nW\n"),
        "accept",
        records=(("a", b"MKVLLAG"), ("b", b"W")),
    ),
    Case("lower_case", one(b">a\nmkVl\n"), "accept", records=(("a", b"MKVL"),)),
    Case(
        "whole_alphabet",
        one(b">u\n" + ALPHABET + b"\n>l\n" + ALPHABET.lower() + b"\n"),
        "accept",
        records=(("u", ALPHABET), ("l", ALPHABET.upper())),
    ),
    Case(
        "trailing_star", one(b">a\nMKV*\n>b\nL*\n"), "accept", records=(("a", b"MKV"), ("b", b"L"))
    ),
    Case(
        "trailing_star_own_line",
        one(b">a\nMKV\n*\n\n>b\nL\n"),
        "accept",
        records=(("a", b"MKV"), ("b", b"L")),
    ),
    Case(
        "inner_star",
        one(b">a\nMK*L\n"),
        "error",
        "'*' inside the sequence at position 3",
        "line 2",
    ),
    Case(
        "star_ending_inner_line",
        one(b">a\nMK*\nL\n"),
        "error",
        "'*' inside the sequence at position 3",
        "line 2",
    ),
    Case(
        "double_final_star",
        one(b">a\nMK**\n"),
        "error",
        "'*' inside the sequence at position 3",
        "line 2",
    ),
    Case(
        "inner_star_to_x",
        one(b">a\nMK*\nL*A*\n"),
        "accept",
        records=(("a", b"MKXLXA"),),
        options={"invalid_to_x": True},
    ),
    Case("letter_J", one(b">a\nMK\nVJL\n"), "error", "letter 'J' at position 4", "line 3"),
    Case("digit", one(b">a\nMK1L\n"), "error", "letter '1' at position 3", "sequence a"),
    Case(
        "genbank_numbered_lines",
        one(b">a\n        1 mkvl\n"),
        "error",
        "letter '1' at position 1",
        "line 2",
    ),
    Case("gt_inside_sequence", one(b">a\nMK>L\n"), "error", "letter '>' at position 3", "line 2"),
    Case(
        "non_utf8_in_sequence",
        one(b">a\nMK\xffL\n"),
        "error",
        "byte 0xff at position 3",
        "line 2",
    ),
    Case("nul_in_sequence", one(b">a\nMK\x00L\n"), "error", "byte 0x00 at position 3", "line 2"),
    Case(
        "invalid_letters_to_x",
        one(b">a\nmJ1\xff\x00*L\n"),
        "accept",
        records=(("a", b"MXXXXXL"),),
        options={"invalid_to_x": True},
    ),
    Case("dot_and_dash", one(b">a\nMK.-L\n"), "accept", records=(("a", b"MK.-L"),)),
    Case(
        "spaces_and_tabs_in_sequence",
        one(b">a\n M K\tV  L \t\n\x0bW\x0c\n"),
        "accept",
        records=(("a", b"MKVLW"),),
    ),
    Case(
        "sequence_100k_one_line",
        one(b">long\n" + LONG + b"\n"),
        "accept",
        records=(("long", LONG),),
    ),
    Case(
        "sequence_100k_wrapped",
        one(b">long\n" + _lines(LONG) + b">short\nMK\n"),
        "accept",
        records=(("long", LONG), ("short", b"MK")),
    ),
    # --- nucleotides given as proteins -----------------------------------------------------------
    Case(
        "nucleotide_fasta",
        one(b">read_1 a read\nACGTTGCAAGGCTTAACGATCG\n>read_2\nacgtnngcaaggcttaacgu\n", "reads.fa"),
        "error",
        "holds nucleotide sequences, not proteins (100% of its letters other than N and X are "
        "A, C, G, T, U or IUPAC codes); to embed the peptides of its reads, use --translate "
        "six-frame, or --as-protein for proteins made only of these letters",
    ),
    Case(
        "fastq_without_translate",
        one(b"@read_1\nACGTTGCAAG\n+\nIIIIIIIIII\n", "reads.fq"),
        "error",
        "this looks like a FASTQ file of reads, not FASTA of proteins; to embed the peptides of "
        "its reads, use --translate six-frame",
        "line 1",
    ),
    Case(
        "nucleotide_scaffolds_of_n_runs",
        one(b">scaffold_1\n" + _lines(SCAFFOLD) + b">scaffold_2\n" + _lines(SCAFFOLD[::-1])),
        "error",
        "holds nucleotide sequences, not proteins (100% of its letters other than N and X are "
        "A, C, G, T, U or IUPAC codes); to embed the peptides of its reads, use --translate "
        "six-frame, or --as-protein for proteins made only of these letters",
    ),
    Case(
        "nucleotide_iupac_consensus",
        one(b">consensus_1\n" + _lines(CONSENSUS) + b">consensus_2\n" + _lines(CONSENSUS[::-1])),
        "error",
        "holds nucleotide sequences, not proteins (100% of its letters other than N and X are "
        "A, C, G, T, U or IUPAC codes); to embed the peptides of its reads, use --translate "
        "six-frame, or --as-protein for proteins made only of these letters",
    ),
    Case(
        "nucleotide_letters_as_protein",
        one(b">scaffold_1\n" + _lines(SCAFFOLD) + b">consensus_1\n" + _lines(CONSENSUS)),
        "accept",
        records=(("scaffold_1", SCAFFOLD), ("consensus_1", CONSENSUS)),
        options={"as_protein": True},
    ),
    Case(
        "protein_rich_in_base_letters",
        one(
            b">metallothionein\n"
            + METALLOTHIONEIN
            + b"\n>threonines\n"
            + METALLOTHIONEIN.replace(b"S", b"T")
            + b"\n>asparagines\n"
            + b"NNNNNNNNNNNNNNNNACGTSKACGTNNNNNNNNNNDSCGATKAS" * 5
            + b"\n"
        ),
        "accept",
        records=(
            ("metallothionein", METALLOTHIONEIN),
            ("threonines", METALLOTHIONEIN.replace(b"S", b"T")),
            ("asparagines", b"NNNNNNNNNNNNNNNNACGTSKACGTNNNNNNNNNNDSCGATKAS" * 5),
        ),
    ),
    Case(
        "protein_with_translate",
        one(PROTEINS, "proteins.fa"),
        "error",
        "holds proteins, not nucleotide reads (37% of its letters other than N and X are not "
        "nucleotide codes, such as L, P and E); to embed its sequences as proteins, drop "
        "--translate six-frame",
        options={"translate": "six-frame"},
    ),
    Case(
        "protein_of_base_letters",
        one(b">short\nGATTACA\n>linker\n" + b"GGGGS" * 40 + b"\n>antifreeze\n" + AFP + b"\n"),
        "accept",
        records=(("short", b"GATTACA"), ("linker", b"GGGGS" * 40), ("antifreeze", AFP)),
    ),
    # --- lines ---------------------------------------------------------------------------------
    Case(
        "crlf",
        one(b">a d\r\nMK\r\nVL\r\n>b\r\nW*\r\n"),
        "accept",
        records=(("a", b"MKVL"), ("b", b"W")),
    ),
    Case(
        "mixed_line_endings",
        one(b">a\r\nMK\nVL\r\n\r\n>b\nW"),
        "accept",
        records=(("a", b"MKVL"), ("b", b"W")),
    ),
    Case(
        "cr_only_line_endings",
        one(b">a\rMK\r>b\rVL\r"),
        "error",
        "classic Mac line breaks",
        "line 1",
    ),
    Case(
        "lone_cr_in_sequence_line",
        one(b">a\nMK\rVL\n"),
        "error",
        "classic Mac line breaks",
        "line 2",
    ),
    Case(
        "blank_lines_between_records",
        one(b"\n\n>a\n\nMK\n\n\nVL\n \n\t\n>b\n\nW\n\n"),
        "accept",
        records=(("a", b"MKVL"), ("b", b"W")),
    ),
    Case(
        "no_final_newline", one(b">a\nMK\n>b\nVL"), "accept", records=(("a", b"MK"), ("b", b"VL"))
    ),
    Case("utf8_bom", one(b"\xef\xbb\xbf>a\nMK\n"), "accept", records=(("a", b"MK"),)),
    Case(
        "comment_line_before_header",
        one(b";old-style comment\n>a\nMK\n"),
        "error",
        "';' comment lines",
        "line 1",
    ),
    Case(
        "comment_line_in_record",
        one(b">a\nMK\n;comment\nVL\n"),
        "error",
        "';' comment lines",
        "line 3",
    ),
    Case(
        "indented_header",
        one(b">a\nMK\n  >b\nVL\n"),
        "error",
        "whitespace before the '>'",
        "line 3",
    ),
    # --- compression ---------------------------------------------------------------------------
    Case(
        "gzip",
        one(gzip.compress(b">a\nMK\n>b\nVL\n"), "input.fa.gz"),
        "accept",
        records=(("a", b"MK"), ("b", b"VL")),
    ),
    Case(
        "gzip_named_fa",
        one(gzip.compress(b">a\nMK\n"), "input.fa"),
        "accept",
        records=(("a", b"MK"),),
    ),
    Case("plain_named_gz", one(b">a\nMK\n", "input.fa.gz"), "accept", records=(("a", b"MK"),)),
    Case(
        "gzip_multi_member",
        one(gzip.compress(b">a\nMK\n") + gzip.compress(b">b\nVL\n"), "input.fa.gz"),
        "accept",
        records=(("a", b"MK"), ("b", b"VL")),
    ),
    Case(
        "gzip_zero_padding",
        one(gzip.compress(b">a\nMK\n") + b"\x00" * 512, "input.fa.gz"),
        "accept",
        records=(("a", b"MK"),),
    ),
    Case(
        "gzip_truncated",
        one(gzip.compress(b">a\n" + LONG + b"\n")[:-4096], "input.fa.gz"),
        "error",
        "truncated gzip file",
    ),
    Case(
        "gzip_trailing_garbage",
        one(gzip.compress(b">a\nMK\n") + b"garbage\n", "input.fa.gz"),
        "error",
        "trailing garbage",
    ),
    Case(
        "gzip_bad_crc",
        one(_gzip_bad_crc(b">a\nMK\n"), "input.fa.gz"),
        "error",
        "damaged gzip file (CRC check failed",
    ),
    Case(
        "gzip_bad_deflate_data",
        one(_gzip_bad_deflate(b">a\nMK\n"), "input.fa.gz"),
        "error",
        "damaged gzip file",
    ),
    Case(
        "gzip_with_bad_letter",
        one(gzip.compress(b">a\nMK\n>b\nMJ\n"), "input.fa.gz"),
        "error",
        "letter 'J' at position 2",
        "line 4",
    ),
    Case("bzip2", one(bz2.compress(b">a\nMK\n"), "input.fa.bz2"), "error", "bzip2-compressed"),
    Case("xz", one(lzma.compress(b">a\nMK\n"), "input.fa.xz"), "error", "xz-compressed"),
    Case("zip", one(_zip(b">a\nMK\n"), "input.zip"), "error", "a zip archive"),
    # No zstd compressor in the standard library: its magic number is what is recognised.
    Case("zstd", one(b"\x28\xb5\x2f\xfd" + bytes(60), "input.fa.zst"), "error", "zstd-compressed"),
    Case("utf16", one(">a\nMK\n".encode("utf-16")), "error", "UTF-16 text"),
    # --- paths ---------------------------------------------------------------------------------
    Case("directory", _directory, "error", "is a directory"),
    Case("device", _device, "error", "is a device or socket, not a file or a pipe"),
    Case("missing_file", _missing, "error", "does not exist"),
    Case("broken_symlink", _broken_link, "error", "broken symbolic link"),
    Case("symlink_loop", _link_loop, "error", "symbolic link loop"),
    Case("symlink_to_file", _link_to_file, "accept", records=(("a", b"MK"),)),
    Case("same_file_twice", _same_file_twice, "error", "is the same file as input"),
    Case("unreadable_file", _unreadable, "error", "permission denied", unprivileged=True),
    Case("output_in_missing_folder", _missing_output_folder, "error", "does not exist"),
    Case("named_pipe", _fifo(b">a\nMK\n>b\nvl*\n"), "accept", records=(("a", b"MK"), ("b", b"VL"))),
    Case(
        "file_name_with_spaces_and_unicode",
        one(b">a\nMK\n", "my protéines (1).fa"),
        "accept",
        records=(("a", b"MK"),),
    ),
    Case(
        "file_name_with_newline",
        one(b">a\nMJ\n", "bad\nname.fa"),
        "error",
        "letter 'J' at position 2",
        "line 2",
    ),
    # --- several files -------------------------------------------------------------------------
    Case(
        "several_files",
        several(
            ("one.fa", b">a\nMK\n>b\nVL\n"),
            ("two.fa.gz", gzip.compress(b">c\nW\n")),
            ("three.fa", b">d\r\nAC\r\n"),
        ),
        "accept",
        records=(("a", b"MK"), ("b", b"VL"), ("c", b"W"), ("d", b"AC")),
    ),
    Case(
        "bad_letter_in_second_file",
        several(("one.fa", b">a\nMK\n"), ("two.fa", b">b\nM\n\nMZJ\n")),
        "error",
        "letter 'J' at position 4",
        "line 4",
    ),
    Case(
        "empty_file_among_others",
        several(("one.fa", b">a\nMK\n"), ("empty.fa", b""), ("three.fa", b">c\nW\n"), named=(1,)),
        "error",
        "the file is empty",
    ),
]

ERRORS = [case for case in CASES if case.expect == "error"]
ACCEPTS = [case for case in CASES if case.expect == "accept"]
