"""Six-frame translation against Biopython, and frames, ids and coordinates on hand-made reads."""

from __future__ import annotations

import random

import numpy as np
import pytest
from Bio.Seq import Seq

from virnuc_dask.errors import VirnucError
from virnuc_dask.inputs.genetic_codes import CONTEXT_DEPENDENT, TABLES, codon_table
from virnuc_dask.inputs.translate import (
    FRAMES,
    CodonLookup,
    InvalidBase,
    Peptides,
    translate_frames,
)

#: Letters of the random reads: bases of both cases, RNA's U, and ambiguity codes.
LETTERS = "ACGTacgtUuNnRYKMSWBDHV"
WEIGHTS = [6, 6, 6, 6, 3, 3, 3, 3, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]


def _translate(sequences: list[str], **options) -> Peptides:
    data = "".join(sequences).encode()
    length = np.array([len(s) for s in sequences])
    start = np.cumsum(length) - length
    seq = np.frombuffer(data, dtype=np.uint8)
    code = options.pop("code", 1)
    return translate_frames(seq, start, length, CodonLookup.for_code(code), **options)


def _by_frame(peptides: Peptides) -> dict[tuple[int, int], list[tuple[int, str, int, int]]]:
    out: dict[tuple[int, int], list] = {}
    for i in range(len(peptides)):
        key = (int(peptides.sequence[i]), int(peptides.frame[i]))
        out.setdefault(key, []).append(
            (
                int(peptides.orf[i]),
                peptides.peptide(i).decode(),
                int(peptides.nt_start[i]),
                int(peptides.nt_end[i]),
            )
        )
    return out


def _biopython(dna: str, table: int) -> str:
    """Biopython's translation of whole codons, those with a non-ACGT letter read as X."""
    dna = dna[: len(dna) // 3 * 3]
    protein = str(Seq(dna).translate(table=table))
    return "".join(
        "X" if set(dna[3 * i : 3 * i + 3]) - set("ACGT") else letter
        for i, letter in enumerate(protein)
    )


def _biopython_frames(sequence: str, table: int) -> list[str]:
    """The six frames by Biopython (our X rule for ambiguous codons)."""
    dna = sequence.upper().replace("U", "T")
    reverse = str(Seq(dna).reverse_complement())
    return [_biopython(strand[offset:], table) for strand in (dna, reverse) for offset in range(3)]


def _informative(peptide: str) -> bool:
    return bool(peptide) and set(peptide) != {"X"}


def _bases_of(sequence: str, frame: int, start: int, end: int) -> str:
    """The bases a peptide was translated from, read in its frame's direction."""
    dna = sequence.upper().replace("U", "T")[start:end]
    return dna if frame < 3 else str(Seq(dna).reverse_complement())


@pytest.mark.parametrize("table", list(TABLES))
def test_equals_biopython_for_every_table(table):
    """Every frame of 120 random reads (N, IUPAC codes, lower case, RNA) in both modes."""
    rng = random.Random(table)
    reads = ["".join(rng.choices(LETTERS, WEIGHTS, k=rng.randint(0, 60))) for _ in range(120)]
    expected = [_biopython_frames(read, table) for read in reads]

    whole = _by_frame(_translate(reads, code=table))
    for r, frames in enumerate(expected):
        for f, protein in enumerate(frames):
            if "*" in protein or not _informative(protein):
                assert (r, f) not in whole, (reads[r], FRAMES[f])
            else:
                assert [p for _, p, _, _ in whole.pop((r, f))] == [protein]
    assert not whole

    pieces = _by_frame(_translate(reads, code=table, frames="orfs", min_peptide=1))
    for r, frames in enumerate(expected):
        for f, protein in enumerate(frames):
            want = [(k + 1, p) for k, p in enumerate(protein.split("*")) if _informative(p)]
            got = pieces.pop((r, f), [])
            assert [(k, p) for k, p, _, _ in got] == want, (reads[r], FRAMES[f])
            # Coordinates: the bases at [nt_start, nt_end) translate to the piece.
            for _, peptide, start, end in got:
                assert _biopython(_bases_of(reads[r], f, start, end), table) == peptide
    assert not pieces


def test_codon_tables_are_ncbis():
    standard = codon_table(1)
    assert standard["ATG"] == "M" and standard["TGG"] == "W"
    assert [c for c, a in standard.items() if a == "*"] == ["TAA", "TAG", "TGA"]
    assert codon_table(4)["TGA"] == "W"  # mycoplasma
    assert codon_table(11) == standard  # bacteria: same letters, other starts
    assert codon_table(25)["TGA"] == "G"  # SR1 and Gracilibacteria
    for number in CONTEXT_DEPENDENT:
        with pytest.raises(VirnucError, match="depending on their place in a gene"):
            codon_table(number)
    with pytest.raises(VirnucError, match="not an NCBI table"):
        codon_table(7)


def test_frames_and_coordinates_of_a_hand_made_read():
    #       F1: ATG AAA CCC GGG TTT AAA -> M K P G F K
    #       F2:  TGA ... stop;  F3: GAA ACC CGG GTT TAA -> E T R V *
    # reverse complement TTTAAACCCGGGTTTCAT:
    #       R1: TTT AAA CCC GGG TTT CAT -> F K P G F H
    #       R2:  TTA AAC CCG GGT TTC -> L N P G F;  R3: TAA ... stop
    read = "ATGAAACCCGGGTTTAAA"
    got = _by_frame(_translate([read]))
    assert got == {
        (0, 0): [(1, "MKPGFK", 0, 18)],
        (0, 3): [(1, "FKPGFH", 0, 18)],
        (0, 4): [(1, "LNPGF", 2, 17)],
    }
    pieces = _by_frame(_translate([read], frames="orfs", min_peptide=2))
    assert pieces[(0, 1)] == [(2, "NPGL", 4, 16)]  # after the stop TGA at bases 1-3
    assert pieces[(0, 2)] == [(1, "ETRV", 2, 14)]
    assert pieces[(0, 5)] == [(2, "TRVS", 1, 13)]  # R3: TAA ACC CGG GTT TCA T
    assert (0, 0) in pieces and (0, 3) in pieces and (0, 4) in pieces


def test_only_complete_codons_short_reads_and_rna():
    got = _by_frame(_translate(["AUGGC", "ac", "", "AUG"]))
    # AUGGC: F1 AUG -> M (bases 0-3), F2 UGG -> W, F3 GGC -> G; the reverse complement GCCAU:
    # R1 GCC -> A (bases 2-5), R2 CCA -> P (1-4), R3 CAU -> H (0-3).
    assert got == {
        (0, 0): [(1, "M", 0, 3)],
        (0, 1): [(1, "W", 1, 4)],
        (0, 2): [(1, "G", 2, 5)],
        (0, 3): [(1, "A", 2, 5)],
        (0, 4): [(1, "P", 1, 4)],
        (0, 5): [(1, "H", 0, 3)],
        (3, 0): [(1, "M", 0, 3)],
        (3, 3): [(1, "H", 0, 3)],
    }


def test_ambiguous_codons_are_x_and_all_x_peptides_are_dropped():
    got = _by_frame(_translate(["ATGNNNAAA", "NNNNNN", "ctnGGrATG"]))
    assert got[(0, 0)] == [(1, "MXK", 0, 9)]
    assert not any(key[0] == 1 for key in got)  # every frame of NNNNNN is X only
    # CTN is Leu whatever N is, and Biopython says L; the rule here is X for any non-ACGT.
    assert got[(2, 0)] == [(1, "XXM", 0, 9)]


def test_min_peptide_and_orf_places():
    # F1 of TAA ATG TAA AAA AAA: * M * K K -> pieces 2 (M) and 3 (KK).
    read = "TAAATGTAAAAAAAA"
    got = _by_frame(_translate([read], frames="orfs", min_peptide=1))
    assert got[(0, 0)] == [(2, "M", 3, 6), (3, "KK", 9, 15)]
    got = _by_frame(_translate([read], frames="orfs", min_peptide=2))
    assert got[(0, 0)] == [(3, "KK", 9, 15)]  # a piece keeps its place whatever the minimum
    assert (0, 0) not in _by_frame(_translate([read], min_peptide=1))  # F1 has stops
    assert not _by_frame(_translate(["AAAAAA"], min_peptide=3))  # frames of 2 and 1 codons


def test_peptides_come_in_read_frame_order_whatever_the_lengths():
    rng = random.Random(5)
    reads = ["".join(rng.choices("ACGT", k=rng.choice([30, 31, 45, 90]))) for _ in range(200)]
    peptides = _translate(reads, frames="orfs", min_peptide=1)
    key = list(zip(peptides.sequence, peptides.frame, peptides.orf, strict=True))
    assert key == sorted(key)


def test_a_letter_that_is_no_base_is_reported_with_its_read_and_position():
    # The reads have different lengths, so they are translated in different groups: the
    # first bad letter of the batch is reported, not the first of the group done first.
    with pytest.raises(InvalidBase) as bad:
        _translate(["ACGTACGT", "ACGTAEGTAA", "AC-T"])
    assert (bad.value.sequence, bad.value.position, chr(bad.value.byte)) == (1, 5, "E")
    with pytest.raises(InvalidBase) as bad:
        _translate(["ACGTACGTAAAA", "AC.T"])
    assert (bad.value.sequence, bad.value.position, chr(bad.value.byte)) == (1, 2, ".")
