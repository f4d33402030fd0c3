"""Unit tests of the FASTA index: scanning, validation messages, reading back, save/load."""

from __future__ import annotations

import gzip
import os
import threading
import zlib

import numpy as np
import pytest

from virnuc_dask.errors import VirnucError
from virnuc_dask.inputs import FastaIndex, build_index, read_sequences
from virnuc_dask.inputs.duplicates import check_duplicates
from virnuc_dask.inputs.fasta import MAX_ID_BYTES

LETTERS = b"ACDEFGHIKLMNPQRSTVWYXBUZO.-"


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def records(index: FastaIndex) -> list[tuple[str, bytes]]:
    return list(zip(index.ids(), read_sequences(index, np.arange(len(index))), strict=True))


def error_of(*args, **kwargs) -> str:
    with pytest.raises(VirnucError) as error:
        build_index(*args, **kwargs)
    return str(error.value)


# --- an independent parser and a random FASTA generator, for round trips --------------------


def simple_parse(data: bytes) -> list[tuple[str, bytes]]:
    """A deliberately naive reading of the format, sharing no code with the index."""
    out = []
    for chunk in data.replace(b"\r\n", b"\n").split(b"\n>"):
        chunk = chunk.removeprefix(b">")
        header, _, body = chunk.partition(b"\n")
        sequence = bytes(c for c in body.upper() if c not in b" \t\n\r")
        out.append((header.split()[0].decode(), sequence.removesuffix(b"*")))
    return out


def random_fasta(rng: np.random.Generator, count: int, prefix: str = "seq") -> bytes:
    """Records with random line widths, case, inner whitespace, stars, CRLF and blank lines."""
    parts = []
    for i in range(count):
        n = int(rng.integers(1, 400))
        sequence = bytes(LETTERS[j] for j in rng.integers(0, len(LETTERS), n))
        if rng.random() < 0.3:
            sequence = sequence.lower()
        if rng.random() < 0.2:
            sequence += b"*"
        end = b"\r\n" if rng.random() < 0.3 else b"\n"
        width = int(rng.integers(5, 120))
        lines = [sequence[k : k + width] for k in range(0, len(sequence), width)]
        if rng.random() < 0.2:
            lines = [line[:2] + b" \t" + line[2:] for line in lines]
        parts.append(b">%s_%d description %d" % (prefix.encode(), i, i) + end)
        parts.extend(line + end for line in lines)
        if rng.random() < 0.2:
            parts.append(end)
    return b"".join(parts)


# --- the format -------------------------------------------------------------------------------


def test_multi_line_records(tmp_path):
    path = write(tmp_path / "a.fa", b">a first\nMKV\nLLA\nG\n>b\nW\n>c\nAC\nDE\n")
    index = build_index([path])
    assert records(index) == [("a", b"MKVLLAG"), ("b", b"W"), ("c", b"ACDE")]
    assert index.line.tolist() == [1, 5, 7]
    assert index.file.tolist() == [0, 0, 0]


def test_several_files_keep_their_order(tmp_path):
    one = write(tmp_path / "one.fa", b">a\nMK\n>b\nVL\n")
    two = write(tmp_path / "two.fa", b">c\nW\n")
    index = build_index([one, two])
    assert records(index) == [("a", b"MK"), ("b", b"VL"), ("c", b"W")]
    assert index.file.tolist() == [0, 0, 1]
    assert index.inputs == [one, two]


def test_gzip_is_decompressed_into_staging(tmp_path):
    packed = write(tmp_path / "a.fa.gz", gzip.compress(b">a\nMK\n>b\nvl*\n"))
    plain = write(tmp_path / "b.fa", b">c\nW\n")
    staging = tmp_path / "staging"
    index = build_index([packed, plain], staging)
    assert records(index) == [("a", b"MK"), ("b", b"VL"), ("c", b"W")]
    assert os.path.dirname(index.files[0]) == str(staging.resolve())
    assert index.files[1] == str((tmp_path / "b.fa").resolve())
    assert sorted(p.name for p in staging.iterdir()) == ["input-0000-a.fa"]
    assert index.inputs[0] == packed


def test_gzip_needs_a_staging_directory(tmp_path):
    packed = write(tmp_path / "a.fa.gz", gzip.compress(b">a\nMK\n"))
    assert "staging directory is needed" in error_of([packed])


def test_a_pipe_is_copied_into_staging(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    data = gzip.compress(b">a\nMK\n") + gzip.compress(b">b\nVL\n")

    def feed():
        with open(pipe, "wb") as f:
            f.write(data)

    threading.Thread(target=feed, daemon=True).start()
    index = build_index([str(pipe)], tmp_path / "staging")
    assert records(index) == [("a", b"MK"), ("b", b"VL")]


def test_crlf_and_mixed_line_endings(tmp_path):
    path = write(tmp_path / "a.fa", b">a x\r\nMK\r\nVL\n>b\nW\r\n\r\n>c\r\nAC")
    index = build_index([path])
    assert records(index) == [("a", b"MKVL"), ("b", b"W"), ("c", b"AC")]


def test_blank_lines_between_records(tmp_path):
    path = write(tmp_path / "a.fa", b"\n\n>a\n\nMK\n\n \nVL\n\t\n>b\nW\n\n\n")
    assert records(build_index([path])) == [("a", b"MKVL"), ("b", b"W")]


def test_lower_case_is_upper_cased_on_read(tmp_path):
    path = write(tmp_path / "a.fa", b">a\nmkvl\n>b\nMkVl\n")
    assert records(build_index([path])) == [("a", b"MKVL"), ("b", b"MKVL")]


def test_trailing_star_is_dropped(tmp_path):
    path = write(tmp_path / "a.fa", b">a\nMKV*\n>b\nMK\n*\n\n>c\nW*")
    index = build_index([path])
    assert records(index) == [("a", b"MKV"), ("b", b"MK"), ("c", b"W")]
    assert index.length.tolist() == [3, 2, 1]


def test_whitespace_inside_sequence_lines_is_ignored(tmp_path):
    path = write(tmp_path / "a.fa", b">a\n M K\tV \x0bL\x0c \n  W\n")
    index = build_index([path])
    assert records(index) == [("a", b"MKVLW")]
    assert index.length.tolist() == [5]


def test_dot_and_dash_are_letters(tmp_path):
    path = write(tmp_path / "a.fa", b">a\nMK.-L\n>b\n-\n")
    assert records(build_index([path])) == [("a", b"MK.-L"), ("b", b"-")]


def test_every_letter_of_the_alphabet(tmp_path):
    path = write(tmp_path / "a.fa", b">u\n" + LETTERS + b"\n>l\n" + LETTERS.lower() + b"\n")
    assert records(build_index([path])) == [("u", LETTERS), ("l", LETTERS)]


def test_utf8_byte_order_mark_is_skipped(tmp_path):
    path = write(tmp_path / "a.fa", b"\xef\xbb\xbf>a\nMK\n")
    assert records(build_index([path])) == [("a", b"MK")]


# --- reading back -----------------------------------------------------------------------------


def test_read_sequences_round_trip_random_rows(tmp_path):
    rng = np.random.default_rng(7)
    one = random_fasta(rng, 300, "one")
    two = random_fasta(rng, 200, "two")
    paths = [write(tmp_path / "one.fa", one), write(tmp_path / "two.fa.gz", gzip.compress(two))]
    index = build_index(paths, tmp_path / "staging")
    expected = simple_parse(one) + simple_parse(two)
    # Unique sequences, so that any misaligned row would show.
    assert len({s for _, s in expected}) == len(expected)
    assert index.ids() == [i for i, _ in expected]
    assert index.length.tolist() == [len(s) for _, s in expected]
    for _ in range(5):
        rows = rng.choice(len(expected), size=int(rng.integers(1, 120)), replace=False)
        assert read_sequences(index, rows) == [expected[r][1] for r in rows]
        assert index.ids(rows) == [expected[r][0] for r in rows]


def test_digests_are_of_the_letters_the_model_reads(tmp_path):
    import hashlib

    rng = np.random.default_rng(11)
    data = random_fasta(rng, 300)
    for invalid_to_x in (False, True):
        odd = b">odd\nAC*\n*\nmk#k\n" if invalid_to_x else b""
        index = build_index([write(tmp_path / "a.fa", data + odd)], invalid_to_x=invalid_to_x)
        read = read_sequences(index, np.arange(len(index)))
        expected = [hashlib.blake2b(s, digest_size=16).digest() for s in read]
        assert index.digests.shape == (len(index), 16)
        assert [bytes(d) for d in index.digests] == expected


def test_equal_sequences_have_one_digest_whatever_their_case_and_lines(tmp_path):
    data = b">a\nMKV\nLA*\n>b\nmkvla\n>c\nMK VLA\r\n>d\nMKVLV\n"
    index = build_index([write(tmp_path / "a.fa", data)])
    a, b, c, d = (bytes(row) for row in index.digests)
    assert a == b == c
    assert d != a


def test_read_sequences_with_repeated_and_unsorted_rows(tmp_path):
    path = write(tmp_path / "a.fa", b">a\nMK\n>b\nVL\n>c\nW\n")
    index = build_index([path])
    assert read_sequences(index, np.array([2, 0, 2, 1])) == [b"W", b"MK", b"W", b"VL"]
    assert read_sequences(index, np.array([], dtype=np.int64)) == []


def test_read_sequences_notices_a_changed_file(tmp_path):
    path = write(tmp_path / "a.fa", b">a\nMKVL\n>b\nW\n")
    index = build_index([path])
    write(tmp_path / "a.fa", b">a\nMK  \n>b\nW\n")
    with pytest.raises(VirnucError, match="changed since it was indexed: sequence a"):
        read_sequences(index, np.array([0]))


def test_read_sequences_refuses_a_same_length_edit(tmp_path):
    """An edit that keeps every length (one residue swapped) is caught by the checksum."""
    path = write(tmp_path / "a.fa", b">a\nMKVL\n>b x\nACDEF\nGHIKL\nMNPQR\n>c\nW\n")
    index = build_index([path])
    data = (tmp_path / "a.fa").read_bytes()
    where = data.index(b"GHIKL") + 2
    write(tmp_path / "a.fa", data[:where] + b"W" + data[where + 1 :])
    with pytest.raises(VirnucError) as error:
        read_sequences(index, np.array([1]))
    message = str(error.value)
    assert message.startswith(f"{path} changed since it was indexed: sequence b ")
    assert "must not change during a run" in message
    assert read_sequences(index, np.array([2, 0])) == [b"W", b"MKVL"]


def test_read_sequences_names_the_input_of_a_changed_staged_copy(tmp_path):
    packed = write(tmp_path / "a.fa.gz", gzip.compress(b">a\nMKVL\n"))
    index = build_index([packed], tmp_path / "staging")
    write(tmp_path / "staging" / "input-0000-a.fa", b">a\nMKVW\n")
    with pytest.raises(VirnucError, match="staged copy .* of input .*a.fa.gz changed since"):
        read_sequences(index, np.array([0]))


def test_checksum_is_of_the_bytes_read_back(tmp_path):
    """Per sequence, CRC-32 of exactly the span a worker reads: inner blank lines, CRLF, spaces
    and a final '*' included, the header and the line end after the last residue excluded."""
    rng = np.random.default_rng(11)
    data = random_fasta(rng, 300) + b">last\nMK\r\n\r\n \t\nVL*  \r\n\n"
    path = write(tmp_path / "a.fa", data)
    index = build_index([path])
    assert index.checksum.dtype == np.uint32
    spans = [data[o : o + s] for o, s in zip(index.offset, index.span, strict=True)]
    assert spans[-1] == b"MK\r\n\r\n \t\nVL*"
    assert index.checksum.tolist() == [zlib.crc32(span) for span in spans]


def test_load_refuses_an_index_without_checksums(tmp_path):
    """An index saved by a version without checksums (a worker on another version)."""
    index = build_index([write(tmp_path / "a.fa", b">a\nMK\n")])
    index.save(tmp_path / "index")
    (tmp_path / "index" / "checksum.npy").unlink(missing_ok=True)
    with pytest.raises(VirnucError, match="index .* has no per-sequence checksums"):
        FastaIndex.load(tmp_path / "index")


def test_save_and_load_round_trip_memory_mapped(tmp_path):
    rng = np.random.default_rng(3)
    data = random_fasta(rng, 50)
    path = write(tmp_path / "a.fa", data)
    index = build_index([path], invalid_to_x=True)
    index.save(tmp_path / "index")
    loaded = FastaIndex.load(tmp_path / "index")
    for name in FastaIndex._ARRAYS:
        array = getattr(loaded, name)
        assert isinstance(array, np.memmap), name
        assert not array.flags.writeable, name
        np.testing.assert_array_equal(array, getattr(index, name))
    assert (loaded.inputs, loaded.files) == (index.inputs, index.files)
    assert (loaded.digest, loaded.invalid_to_x) == (index.digest, True)
    expected = simple_parse(data)
    rows = rng.permutation(len(index))
    assert read_sequences(loaded, rows) == [expected[r][1] for r in rows]
    assert loaded.ids(rows) == [expected[r][0] for r in rows]


def test_digest_follows_the_contents(tmp_path):
    a = build_index([write(tmp_path / "a.fa", b">a\nMK\n")]).digest
    b = build_index([write(tmp_path / "b.fa", b">a\nMK\n")]).digest
    c = build_index([write(tmp_path / "c.fa", b">a\nML\n")]).digest
    assert a == b != c


# --- ids --------------------------------------------------------------------------------------


def test_duplicate_ids_are_refused_by_default(tmp_path):
    one = write(tmp_path / "one.fa", b">a\nMK\n>b\nM\n")
    two = write(tmp_path / "two.fa", b">c\nL\n>b x\nW\n")
    message = error_of([one, two])
    assert f"duplicate id 'b': {one} line 3 and {two} line 3" in message
    assert "--duplicate-ids suffix" in message


def test_duplicate_ids_suffix_never_collides(tmp_path):
    path = write(tmp_path / "a.fa", b">a\nA\n>a\nC\n>a.2\nD\n>a\nE\n>b\nF\n>a.3\nG\n>b\nH\n")
    index = build_index([path], duplicate_ids="suffix")
    assert index.ids() == ["a", "a.4", "a.2", "a.5", "b", "a.3", "b.2"]
    assert read_sequences(index, np.arange(7)) == [b"A", b"C", b"D", b"E", b"F", b"G", b"H"]
    assert len(set(index.ids())) == len(index)


def test_suffixed_names_that_are_themselves_repeated(tmp_path):
    path = write(tmp_path / "a.fa", b">a\nA\n>a\nC\n>a.2\nD\n>a.2\nE\n")
    index = build_index([path], duplicate_ids="suffix")
    assert index.ids() == ["a", "a.3", "a.2", "a.2.2"]


def test_duplicate_ids_policy_is_checked(tmp_path):
    path = write(tmp_path / "a.fa", b">a\nA\n")
    assert "duplicate_ids must be one of" in error_of([path], duplicate_ids="rename")


def test_hash_collisions_are_not_duplicates(tmp_path):
    path = write(tmp_path / "a.fa", b">a\nA\n>b\nC\n>c\nD\n")
    index = build_index([path])
    check_duplicates(index, np.zeros(3, dtype=np.int64), "error")  # every hash equal
    assert index.ids() == ["a", "b", "c"]


def test_ids_differing_only_in_case_are_distinct(tmp_path):
    path = write(tmp_path / "a.fa", b">abc\nA\n>ABC\nC\n>aBc\nD\n")
    index = build_index([path])
    assert index.ids() == ["abc", "ABC", "aBc"]


def test_id_is_the_first_word_and_may_hold_slashes(tmp_path):
    path = write(tmp_path / "a.fa", b">sp|P1|X_HUMAN/1-100 desc / more\tstuff\n>b\n>  c  d\nA\n")
    assert "sequence sp|P1|X_HUMAN/1-100 is empty" in error_of([path])
    write(tmp_path / "a.fa", b">sp|P1|X_HUMAN/1-100 desc / more\tstuff\nA\n>  c  d\nA\n")
    assert build_index([path]).ids() == ["sp|P1|X_HUMAN/1-100", "c"]


def test_description_in_any_encoding_but_id_in_utf8(tmp_path):
    path = write(tmp_path / "a.fa", ">β-lactamase d\xe9scription\nA\n".encode())
    assert build_index([path]).ids() == ["β-lactamase"]
    write(tmp_path / "a.fa", b">a d\xe9sc\nA\n")
    assert build_index([path]).ids() == ["a"]
    write(tmp_path / "a.fa", b">a\nA\n>id\xe9 x\nA\n")
    assert "line 3: id is not valid UTF-8 (byte 0xe9 at column 4)" in error_of([path])


def test_ids_are_capped_in_utf8_bytes(tmp_path):
    at_cap = "β" * (MAX_ID_BYTES // 2)
    path = write(tmp_path / "a.fa", f">a\nA\n>{at_cap} d\nA\n".encode())
    assert build_index([path]).ids() == ["a", at_cap]
    over = at_cap + "x"  # one character more than half the cap, but over it in bytes
    write(tmp_path / "a.fa", f">a\nA\n>{over} d\nA\n".encode())
    message = error_of([path])
    assert message.startswith(
        f"{path}, line 3: id '{'β' * 60}...' is {MAX_ID_BYTES + 1} bytes long (UTF-8), over "
        f"the limit of {MAX_ID_BYTES}"
    )
    assert "shorten the header's first word" in message


# --- invalid letters --------------------------------------------------------------------------


def test_invalid_to_x_maps_every_invalid_byte_to_x(tmp_path):
    path = write(tmp_path / "a.fa", b">a\nMJK\n1*2\n\xff\x00L\nJ*\n>b\nj*\n")
    index = build_index([path], invalid_to_x=True)
    assert records(index) == [("a", b"MXKXXXXXLX"), ("b", b"X")]
    assert index.length.tolist() == [10, 1]


def test_invalid_letters_are_refused_with_position(tmp_path):
    path = write(tmp_path / "a.fa", b">a\nMK\n>b\nMKVL\nAJ\n")
    message = error_of([path])
    assert message.startswith(f"{path}, line 5: sequence b: letter 'J' at position 6")
    assert "--invalid-to-x" in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b">a\nMK*L\n", "line 2: sequence a: '*' inside the sequence at position 3"),
        (b">a\nMK*\n\nL\n", "line 2: sequence a: '*' inside the sequence at position 3"),
        (b">a\nM\nK**\n", "line 3: sequence a: '*' inside the sequence at position 3"),
        (b">a\nMK1\n", "line 2: sequence a: letter '1' at position 3"),
        (b">a\nMK\xff\n", "line 2: sequence a: byte 0xff at position 3"),
        (b">a\nM K\t\x00\n", "line 2: sequence a: byte 0x00 at position 3"),
    ],
)
def test_refused_letters(tmp_path, data, expected):
    path = write(tmp_path / "a.fa", data)
    assert f"{path}, {expected}" in error_of([path])


# --- files ------------------------------------------------------------------------------------


def test_no_inputs():
    assert error_of([]) == "no input files given"


def test_the_same_file_given_twice_is_refused(tmp_path, monkeypatch):
    path = write(tmp_path / "a.fa", b">a\nMK\n")
    (tmp_path / "link.fa").symlink_to(path)
    os.link(path, tmp_path / "hard.fa")
    monkeypatch.chdir(tmp_path)
    for again in (path, "a.fa", "./a.fa", str(tmp_path / "link.fa"), "hard.fa"):
        message = error_of([path, write(tmp_path / "b.fa", b">b\nW\n"), again])
        assert message == (
            f"input {again} is the same file as input {path}; give each file once"
        ), again
    for policy in ("error", "suffix"):
        assert "is the same file" in error_of([path, path], duplicate_ids=policy)


def test_every_input_is_checked_before_the_first_scan(tmp_path, monkeypatch):
    good = write(tmp_path / "a.fa", b">a\nA\n")
    scanned = []
    monkeypatch.setattr("virnuc_dask.inputs.fasta._Scan.file", lambda *a, **k: scanned.append(a))
    assert "does not exist" in error_of([good, str(tmp_path / "missing.fa")])
    assert not scanned


def test_staged_copy_leaves_nothing_behind_on_damage(tmp_path):
    packed = gzip.compress(b">a\n" + b"MKVL" * 50_000 + b"\n")
    path = write(tmp_path / "a.fa.gz", packed[: len(packed) // 2])
    staging = tmp_path / "staging"
    assert "truncated gzip file" in error_of([path], staging)
    assert not list(staging.iterdir())
