"""Reads files: FASTQ by record structure, FASTA of reads, gzip, pipes, and every refusal."""

from __future__ import annotations

import gzip
import os
import random
import threading

import pytest

from virnuc_dask.errors import VirnucError
from virnuc_dask.inputs import staging
from virnuc_dask.inputs.peptides import build_peptide_index
from virnuc_dask.inputs.reads import read_batches


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def reads(path: str) -> list[tuple[str, bytes, int]]:
    """(id, bases, header line) of every read of a file."""
    out = []
    for batch in read_batches(path):
        for i in range(len(batch)):
            bases = batch.seq[batch.start[i] : batch.start[i] + batch.length[i]].tobytes()
            out.append((batch.id(i), bases, int(batch.line[i])))
    return out


def error_of(path: str, tmp_path=None, **options) -> str:
    folder = tmp_path or os.path.dirname(path)
    with pytest.raises(VirnucError) as error:
        build_peptide_index([path], os.path.join(folder, "staging"), **options)
    return str(error.value)


def test_fastq_by_record_structure(tmp_path):
    # Quality lines that begin with '@' and '+' (both are quality letters), a '+' line that
    # repeats the id, CRLF line ends, an empty read, blank lines after the last record.
    data = (
        b"@r1 some description\nACGTN\n+\n@@+@I\n"
        b"@r2\r\nacgu\r\n+r2\r\n+@@+\r\n"
        b"@r3\n\n+\n\n"
        b"@r4\tdescription\nGGG\n+\n@@@\n\n\n"
    )
    path = write(tmp_path / "a.fq", b"\n \n" + data)  # blank lines before the first record
    assert reads(path) == [
        ("r1", b"ACGTN", 3),
        ("r2", b"acgu", 7),
        ("r3", b"", 11),
        ("r4", b"GGG", 15),
    ]


def test_fasta_of_reads(tmp_path):
    data = b"\n\n>r1 desc\nAC GT\nNN\n\n>r2\r\nac\r\ng\r\n>r3\nAAA"
    path = write(tmp_path / "a.fa", data)
    assert reads(path) == [("r1", b"ACGTNN", 3), ("r2", b"acg", 7), ("r3", b"AAA", 10)]


@pytest.mark.parametrize("kind", ["fastq", "fasta"])
def test_records_across_blocks(tmp_path, monkeypatch, kind):
    """Blocks of 64 bytes: records, lines and CRLF pairs are cut anywhere."""
    rng = random.Random(3)
    expected, parts = [], []
    for i in range(300):
        bases = "".join(rng.choices("ACGTN", k=rng.randint(0, 130) if kind == "fastq" else 90))
        bases = bases or ("" if kind == "fastq" else "A")
        end = "\r\n" if i % 7 == 0 else "\n"
        if kind == "fastq":
            parts.append(f"@read{i} x{end}{bases}{end}+{end}{'@' * len(bases)}{end}")
            line = 4 * i + 1
        else:
            lines = [bases[k : k + 60] for k in range(0, len(bases), 60)]
            parts.append(f">read{i}{end}" + "".join(f"{piece}{end}" for piece in lines))
            line = 3 * i + 1
        expected.append((f"read{i}", bases.encode(), line))
    path = write(tmp_path / f"a.{kind}", "".join(parts).encode())
    monkeypatch.setattr(staging, "BLOCK_BYTES", 64)
    assert reads(path) == expected
    packed = write(tmp_path / f"a.{kind}.gz", gzip.compress("".join(parts).encode()))
    assert reads(packed) == expected


def test_pipe_and_gzip(tmp_path):
    data = b"@a\nACGTACGTAC\n+\nIIIIIIIIII\n"
    pipe = tmp_path / "pipe.fq"
    os.mkfifo(pipe)

    def feed() -> None:
        with open(pipe, "wb") as f:
            f.write(gzip.compress(data))

    threading.Thread(target=feed, daemon=True).start()
    assert reads(str(pipe)) == [("a", b"ACGTACGTAC", 1)]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            b"@r1\nACGT\n-\nIIII\n",
            "a.fq, line 3: expected the '+' line of read r1, found '-'; FASTQ records are four "
            "lines: @id, bases, +, qualities (wrapped FASTQ is not read)",
        ),
        (
            b"@r1\nACGT\nACGT\n+\nIIII\nIIII\n",  # wrapped FASTQ
            "a.fq, line 3: expected the '+' line of read r1, found 'ACGT'",
        ),
        (
            b"@r1\nACGT\n+\nIIII\n@r2\nACGT\n+\nIII\n",
            "a.fq, line 8: read r2 has 4 bases but 3 quality letters; each base needs one",
        ),
        (
            b"@r1\nACGT\n+\nIIII\n@r2\nAC\n",
            "a.fq, line 6: the file ends inside the record of read r2 (it has 2 of its 4 "
            "lines); is the file truncated?",
        ),
        (
            b"@r1\nACGT\n+\nIIII\n\n@r2\nAC\n+\nII\n",  # a blank line between records
            "a.fq, line 5: expected a read's header line starting with '@', found ''",
        ),
        (
            b"@r1\nACGT\n+\nIIII\n@r2\nACET\n+\nIIII\n",
            "a.fq, line 6: read r2: letter 'E' at position 3 is not a nucleotide (A, C, G, T, U "
            "or an IUPAC code such as N)",
        ),
        (b"@\nACGT\n+\nIIII\n", "a.fq, line 1: header has no id after '@'"),
        (b"", "a.fq: the file is empty"),
        (b"\n\n", "a.fq: no record in its 2 blank line(s)"),
        (b"ACGT\n", "a.fq: not FASTA or FASTQ: the first letter is 'A'"),
    ],
)
def test_malformed_fastq_is_refused_with_file_and_line(tmp_path, data, message):
    path = write(tmp_path / "a.fq", data)
    assert message in error_of(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b">a\nACGT\nAC\nGTX\n", "a.fa, line 4: read a: letter 'X' at position 9 is not a"),
        (b">a\nAC\n>b\n\n>c\nA\n", "a.fa, line 3: read b is empty (no bases after its header)"),
        (b"AC\n>a\nAC\n", "a.fa: not FASTA or FASTQ: the first letter is 'A'"),
        (b">a\nAC\rGT\n", "a.fa, line 2: a carriage return (CR) inside the line"),
        (b">a\nAC\x00GT\n", "a.fa, line 2: the control character 0x00"),
        (b">a\x01b\nACGT\n", "a.fa, line 1: id contains the control character 0x01"),
        (b">a\xffb\nACGT\n", "a.fa, line 1: id is not valid UTF-8 (byte 0xff)"),
        (b">" + b"x" * 1001 + b"\nACGT\n", "a.fa, line 1: id 'xxxx"),
        # M, K and V are IUPAC codes (A/C, G/T, not T): a protein fails at its first L.
        (b">a\nMKVLAAGLLE\n", "a.fa, line 2: read a: letter 'L' at position 4"),
    ],
)
def test_malformed_fasta_of_reads_is_refused_with_file_and_line(tmp_path, data, message):
    path = write(tmp_path / "a.fa", data)
    assert message in error_of(path)


def test_a_protein_file_given_as_reads_is_told_to_drop_translate(tmp_path):
    """The nucleotide rule in reverse: one line for the file, not its first letter."""
    from tests.helpers import EXAMPLE

    assert error_of(str(EXAMPLE), tmp_path=tmp_path) == (
        f"{EXAMPLE} holds proteins, not nucleotide reads (37% of its letters other than N and X "
        "are not nucleotide codes, such as L, P and E); to embed its sequences as proteins, "
        "drop translate=six-frame"
    )
    # Reads with a stray letter still fail at that letter, where it is.
    stray = write(tmp_path / "stray.fa", b">r1\n" + b"ACGTTGCAAG" * 9 + b"ACGTEGCAAG\n")
    assert error_of(stray) == (
        f"{stray}, line 2: read r1: letter 'E' at position 95 is not a nucleotide (A, C, G, T, "
        "U or an IUPAC code such as N)"
    )


def test_truncated_gzip_is_refused_with_file_and_line(tmp_path):
    data = b"".join(b"@r%d\nACGTACGTAC\n+\nIIIIIIIIII\n" % i for i in range(200_000))
    packed = gzip.compress(data)
    path = write(tmp_path / "cut.fq.gz", packed[: len(packed) // 2])
    message = error_of(path)
    assert message.startswith(f"input {path} is a truncated gzip file (it ends inside its ")
    line = int(message.split("in line ")[1].split(":")[0])
    assert 0 < line < 800_000  # where the data stops, about half way
    assert not list((tmp_path / "staging").glob("*"))  # nothing staged is left


def test_damaged_gzip_and_other_compressions(tmp_path):
    packed = bytearray(gzip.compress(b"@a\nACGT\n+\nIIII\n", mtime=0))
    packed[-8] ^= 0xFF
    assert "damaged gzip file" in error_of(write(tmp_path / "crc.fq.gz", bytes(packed)))
    trailing = gzip.compress(b"@a\nACGT\n+\nIIII\n") + b"junk"
    assert "trailing garbage" in error_of(write(tmp_path / "junk.fq.gz", trailing))
    assert "bzip2-compressed" in error_of(write(tmp_path / "b.fq.bz2", b"BZh91AY&SY"))


def test_duplicate_read_ids(tmp_path):
    one = write(tmp_path / "r1.fq", b"@x 1:N\nATGAAACCC\n+\nIIIIIIIII\n")
    two = write(tmp_path / "r2.fq", b"@x 2:N\nATGAAACCC\n+\nIIIIIIIII\n")
    with pytest.raises(VirnucError) as error:
        build_peptide_index([one, two], tmp_path / "staging")
    assert str(error.value).startswith(
        f"duplicate read id 'x': {one} line 1 and {two} line 1; make ids unique or use "
        "--duplicate-ids suffix (the mates of paired-end reads often share ids: give one file "
        "of each pair)"
    )
    index, _ = build_peptide_index([one, two], tmp_path / "staging", duplicate_ids="suffix")
    # ATGAAACCC: F1 MKP, F2 *N, F3 ET; reverse GGGTTTCAT: R1 GFH, R2 GF, R3 VS.
    frames = ["F1", "F3", "R1", "R2", "R3"]
    assert index.ids() == [f"x{f}" for f in frames] + [f"x.2{f}" for f in frames]


def test_a_file_without_reads_and_inputs_without_peptides(tmp_path):
    empty = write(tmp_path / "none.fa", b"\n")
    good = write(tmp_path / "good.fa", b">a\nATGAAA\n")
    assert "no record in its 1 blank line(s)" in error_of(empty)
    # A stop in each of the six frames of both reads.
    stops = write(
        tmp_path / "stops.fa", b">a\nTCCGTTTAGGCTAGTGAACTAACA\n>b\ntccgtttaggctagtgaactaaca\n"
    )
    message = error_of(stops)
    assert "no read of the 1 input(s) has a peptide to embed (2 reads" in message
    assert "try frames=orfs" in message
    index, _ = build_peptide_index([good], tmp_path / "staging")
    assert len(index) > 0
