"""The reads front end: peptide ids, order, provenance, staged peptides, settings, fingerprint."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from Bio.Seq import Seq

from virnuc_dask.config import EmbedConfig
from virnuc_dask.errors import VirnucError, command_line_spelling
from virnuc_dask.inputs import FastaIndex, build_index, index_inputs, read_sequences
from virnuc_dask.inputs.nucleotide import letter_counts, looks_like_nucleotides
from virnuc_dask.inputs.peptides import Translation, build_peptide_index
from virnuc_dask.inputs.provenance import ReadProvenance
from virnuc_dask.model.checkpoint import resolve_weights
from virnuc_dask.plan.fingerprint import fingerprint

READS = [
    ("r1", "ATGAAACCCGGGTTTAAA"),  # F1 MKPGFK, R1 FKPGFH, R2 LNPGF
    ("r2", "TCCGTTTAGGCTAGTGAACTAACA"),  # a stop in every frame
    ("r3", "ATGGCC"),  # F1 MA, F2 W, F3 G; reverse GGCCAT: R1 GH, R2 A, R3 P
]


def fastq(reads) -> bytes:
    return b"".join(f"@{i} x\n{s}\n+\n{'#' * len(s)}\n".encode() for i, s in reads)


def fasta(reads, width: int = 7) -> bytes:
    out = []
    for ident, seq in reads:
        out.append(f">{ident}\n")
        out.extend(seq[k : k + width] + "\n" for k in range(0, len(seq), width))
    return "".join(out).encode()


def expected_peptides(reads, split_bp: int | None = None) -> list[tuple[str, str]]:
    """(id, peptide) of every kept stop-free frame, computed with Biopython, VirNucPro's ids."""
    from virnuc_dask.inputs.split import split_starts

    out = []
    for ident, seq in reads:
        pieces = [(ident, seq)]
        if split_bp:
            _, starts, numbers = split_starts(np.array([len(seq)]), split_bp)
            pieces = [
                (f"{ident}_chunk_{k}", seq[s : s + split_bp])
                for s, k in zip(starts.tolist(), numbers.tolist(), strict=True)
            ]
        for name, part in pieces:
            reverse = str(Seq(part).reverse_complement())
            for strand, text in (("F", part), ("R", reverse)):
                for offset in range(3):
                    codons = text[offset:][: (len(text) - offset) // 3 * 3]
                    protein = str(Seq(codons).translate())
                    if protein and "*" not in protein:
                        out.append((f"{name}{strand}{offset + 1}", protein))
    return out


def test_ids_order_and_peptides_are_virnucpros(tmp_path):
    path = tmp_path / "reads.fq"
    path.write_bytes(fastq(READS))
    index, provenance = build_peptide_index([path], tmp_path / "staging")
    expected = expected_peptides(READS)
    assert index.ids() == [ident for ident, _ in expected]
    peptides = read_sequences(index, np.arange(len(index))[::-1])[::-1]
    assert [p.decode() for p in peptides] == [p for _, p in expected]
    assert index.length.tolist() == [len(p) for _, p in expected]
    variables = provenance.variables(index.id_bytes, index.id_offsets)
    assert variables["read"].tolist() == [i[:2] for i, _ in expected]
    assert variables["frame"].tolist() == [i[2:].encode() for i, _ in expected]
    assert variables["strand"].tolist() == [b"+" if i[2] == "F" else b"-" for i, _ in expected]
    r1 = [k for k, (i, _) in enumerate(expected) if i.startswith("r1")]
    assert variables["nt_start"][r1].tolist() == [0, 0, 2]
    assert variables["nt_end"][r1].tolist() == [18, 18, 17]
    assert provenance.reads == 3
    assert provenance.without_peptides == 1 and provenance.first_without == ["r2"]


@pytest.mark.parametrize("frames", ["stop-free", "orfs"])
def test_peptide_digests_are_of_the_peptides_workers_read(tmp_path, frames):
    import hashlib

    # A duplicate read: its peptides get the same digests as the first one's.
    reads = [*READS, ("r1copy", READS[0][1]), ("long", "ATGAAATAAGGGCCCTTTAAACCCGGGTAG" * 3)]
    path = tmp_path / "reads.fq"
    path.write_bytes(fastq(reads))
    translation = Translation(frames=frames, min_peptide=1)
    index, _ = build_peptide_index([path], tmp_path / "staging", translation)
    read = read_sequences(index, np.arange(len(index)))
    assert [bytes(d) for d in index.digests] == [
        hashlib.blake2b(s, digest_size=16).digest() for s in read
    ]
    ids = index.ids()
    copy = [i for i, ident in enumerate(ids) if ident.startswith("r1copy")]
    first = [i for i, ident in enumerate(ids) if ident.startswith("r1") and i not in copy]
    assert len(copy) == len(first) > 0
    assert np.array_equal(index.digests[copy], index.digests[first])


def test_pieces_with_split_bp(tmp_path):
    reads = [("contig_3", "ATGAAACCCGGGTTTAAAGGGCCCAAATTTGGGCCCAAATTTGGGCC"), ("short", "ATGGCC")]
    path = tmp_path / "reads.fa"
    path.write_bytes(fasta(reads))
    index, provenance = build_peptide_index([path], tmp_path / "staging", Translation(split_bp=12))
    expected = expected_peptides(reads, split_bp=12)
    assert index.ids() == [ident for ident, _ in expected]
    assert "contig_3_chunk_2R1" in index.ids() and "short_chunk_1F1" in index.ids()
    variables = provenance.variables(index.id_bytes, index.id_offsets)
    assert set(variables["read"].tolist()) == {"contig_3", "short"}
    # Coordinates are on the piece; piece_start places them in the read.
    for row, ident in enumerate(index.ids()):
        read = dict(reads)[variables["read"][row]]
        start = int(variables["piece_start"][row])
        assert variables["piece"][row] == int(ident.split("_chunk_")[1][:-2])
        bases = read[start:][int(variables["nt_start"][row]) : int(variables["nt_end"][row])]
        if variables["strand"][row] == b"-":
            bases = str(Seq(bases).reverse_complement())
        assert str(Seq(bases).translate()) == read_sequences(index, [row])[0].decode()


def test_orfs_ids_and_minimum(tmp_path):
    path = tmp_path / "reads.fq"
    path.write_bytes(fastq([("r", "TAAATGTAAAAAAAAATG")]))
    index, provenance = build_peptide_index(
        [path], tmp_path / "staging", Translation(frames="orfs", min_peptide=2)
    )
    # F1: * M * K K M -> pieces 2 (M, too short) and 3 (KKM).
    assert index.ids()[0] == "rF1_orf_3"
    assert read_sequences(index, [0]) == [b"KKM"]
    assert provenance.orf[0] == 3
    assert provenance.settings["min_peptide"] == 2


def test_fastq_and_fasta_give_the_same_index(tmp_path):
    rng = np.random.default_rng(1)
    reads = [
        (f"read_{i}", "".join(rng.choice(list("ACGTN"), rng.integers(20, 90)))) for i in range(200)
    ]
    a = tmp_path / "reads.fq.gz"
    a.write_bytes(gzip.compress(fastq(reads)))
    b = tmp_path / "reads.fa"
    b.write_bytes(fasta(reads, width=13))
    one, p1 = build_peptide_index([a], tmp_path / "s1")
    two, p2 = build_peptide_index([b], tmp_path / "s2")
    assert one.ids() == two.ids()
    assert read_sequences(one, np.arange(len(one))) == read_sequences(two, np.arange(len(two)))
    for name in ("frame", "nt_start", "nt_end", "read_bytes"):
        np.testing.assert_array_equal(getattr(p1, name), getattr(p2, name))
    assert p1.first_without == p2.first_without


def test_saved_and_loaded_with_the_index(tmp_path):
    path = tmp_path / "reads.fq"
    path.write_bytes(fastq(READS))
    index, provenance = build_peptide_index([path], tmp_path / "staging", Translation(split_bp=9))
    index.save(tmp_path / "index")
    provenance.save(tmp_path / "index")
    loaded = ReadProvenance.load(tmp_path / "index")
    again = FastaIndex.load(tmp_path / "index")
    assert again.ids() == index.ids()
    for name in ("frame", "nt_start", "nt_end", "piece", "piece_start", "read_bytes"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(provenance, name))
    assert loaded.orf is None
    assert loaded.attributes() == provenance.attributes()
    listed = json.loads(loaded.attributes()["reads_without_peptides_first"])
    assert listed == provenance.first_without
    assert ReadProvenance.load(tmp_path / "nothing") is None


def test_reads_without_peptides_listed_first_ten(tmp_path):
    stop = "TCCGTTTAGGCTAGTGAACTAACA"
    reads = [(f"s{i}", stop) for i in range(15)] + [("good", "ATGAAACCC")]
    path = tmp_path / "reads.fa"
    path.write_bytes(fasta(reads))
    _, provenance = build_peptide_index([path], tmp_path / "staging")
    assert provenance.without_peptides == 15
    assert provenance.first_without == [f"s{i}" for i in range(10)]
    assert provenance.summary() == (
        "16 reads, 15 with no kept frame (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, ...)"
    )


def test_reads_without_peptides_are_listed_by_their_renamed_ids(tmp_path):
    """With duplicate_ids="suffix" the list names the reads as the output names them."""
    stop = "TCCGTTTAGGCTAGTGAACTAACA"  # a stop in every frame
    one, two = tmp_path / "r1.fa", tmp_path / "r2.fa"
    one.write_bytes(fasta([("x", stop), ("y", "ATGAAACCC")]))
    two.write_bytes(fasta([("x", stop), ("y", "ATGAAACCC")]))
    index, provenance = build_peptide_index(
        [one, two], tmp_path / "staging", duplicate_ids="suffix"
    )
    assert "y.2F1" in index.ids()
    assert provenance.first_without == ["x", "x.2"]
    assert provenance.summary() == "4 reads, 2 with no kept frame (x, x.2)"


def test_settings_and_their_errors():
    with pytest.raises(VirnucError, match="genetic code 27 is not offered"):
        EmbedConfig.from_settings(translate="six-frame", genetic_code=27)
    with pytest.raises(VirnucError, match="min peptide must be at least 1"):
        EmbedConfig.from_settings(translate="six-frame", min_peptide=0)
    with pytest.raises(VirnucError, match="split bp must be at least 3"):
        EmbedConfig.from_settings(translate="six-frame", split_bp=2)
    with pytest.raises(VirnucError, match="translate must be one of six-frame"):
        EmbedConfig.from_settings(translate="three-frame")
    with pytest.raises(VirnucError) as error:
        EmbedConfig.from_settings(split_bp=300)
    assert str(error.value) == ("split_bp=300 applies to nucleotide reads: add translate=six-frame")
    with command_line_spelling(), pytest.raises(VirnucError) as error:
        EmbedConfig.from_settings(frames="orfs")
    assert (
        str(error.value) == "--frames orfs applies to nucleotide reads: add --translate six-frame"
    )
    config = EmbedConfig.from_settings(translate="six-frame", frames="orfs")
    assert config.translation().shortest == 30
    assert EmbedConfig.from_settings().translation() is None


def test_fingerprint_covers_the_translation(tmp_path):
    path = tmp_path / "reads.fq"
    path.write_bytes(fastq(READS))
    weights = resolve_weights("esm2_t2_tiny", random_weights=True)
    prints = set()
    for settings in (
        {},
        {"genetic_code": 11},
        {"frames": "orfs", "min_peptide": 1},
        {"frames": "orfs", "min_peptide": 2},
        {"split_bp": 12},
    ):
        config = EmbedConfig.from_settings(model="esm2_t2_tiny", translate="six-frame", **settings)
        index, _ = index_inputs([path], tmp_path / "staging", config)
        prints.add(fingerprint(index, weights, config))
    assert len(prints) == 5
    # Proteins keep the fingerprint they had before reads existed (no translation key).
    protein = tmp_path / "p.fa"
    protein.write_bytes(b">p\nMKV\n")
    config = EmbedConfig.from_settings(model="esm2_t2_tiny")
    index, reads = index_inputs([protein], tmp_path / "staging", config)
    assert reads is None
    assert fingerprint(index, weights, config) == fingerprint(
        build_index([protein]), weights, config
    )


# ---------------------------------------------------------------------------------------------
# Telling nucleotides from proteins (without --translate)

METALLOTHIONEIN = "MDPNCSCAAGDSCTCAGSCKCKECKCTSCKKSCCSCCPVGCAKCSQGCICKEASDKCSCCA"
PROTEINS = {
    "poly-alanine": "A" * 200,
    "poly-glycine linker": "GGGGS" * 40,
    "antifreeze type I": "DTASDAAAAAALTAANAKAAAELTAANAAAAAAATAR" * 4,
    "metallothionein": METALLOTHIONEIN,
    "collagen": "GPPGPAGPPGAPGPPGAAGTPGPQGIAG" * 6,
    "peptide of bases": "GATTACA",
    "short all-base peptide": "ACGTACGTACGTACGTACG",  # under 20 letters
    "silk": "GAGAGSGAAGAGAGAGSAGAGAGAGTGAGAGS" * 4,
    # Rich in A, C, G, T, N and S: all but a tenth of its letters are nucleotide codes.
    "metallothionein, serines as threonines": METALLOTHIONEIN.replace("S", "T"),
    "asparagine-rich with A, C, G, T, S": "NNNNNNNNNNNNNNNNACGTSKACGTNNNNNNNNNNDSCGATKAS" * 5,
}
NUCLEOTIDES = {
    "random DNA": "ACGT" * 10 + "GATTACAGGCCTTAAGC" * 20,
    "AT-rich DNA with N": "ATTATAATTTACGATTATNNNATAAATTGCATATAT" * 10,
    "RNA lower case": "acguuagcuaggcuaacgguuagcauuagc" * 8,
    # Issue 20: scaffolds of long N runs (85% N), and a consensus with 15% IUPAC codes.
    "scaffold of N runs": ("N" * 170 + "ACGTTGCAAGGCTTAACGATCGATTACAGG") * 10,
    "IUPAC consensus": "ACGTRACGGTYACTTGKACMGATSAGCWTTGACAGTAACG" * 10,
}


@pytest.mark.parametrize("name", PROTEINS)
def test_a_protein_is_never_taken_for_nucleotides(name):
    counts = letter_counts(PROTEINS[name].encode())
    assert looks_like_nucleotides(counts) is None


@pytest.mark.parametrize("name", NUCLEOTIDES)
def test_nucleotides_are_recognised(name):
    counts = letter_counts(NUCLEOTIDES[name].encode())
    share = looks_like_nucleotides(counts)
    assert share is not None and share >= 0.9


def test_random_proteins_rich_in_acgtn_are_proteins():
    rng = np.random.default_rng(0)
    # Half of the letters from A, C, G, T, N: far above real proteins' share (about 26%).
    letters = np.array(list("ACGTN" * 3 + "DEFHIKLMPQRSVWY"))
    for _ in range(200):
        protein = "".join(rng.choice(letters, rng.integers(30, 600)))
        assert looks_like_nucleotides(letter_counts(protein.encode())) is None


def test_nucleotide_fasta_is_refused_without_translate(tmp_path):
    path = tmp_path / "reads.fa"
    path.write_bytes(fasta([("r1", NUCLEOTIDES["random DNA"])]))
    with pytest.raises(VirnucError) as error:
        build_index([path])
    assert str(error.value) == (
        f"{path} holds nucleotide sequences, not proteins (100% of its letters other than N and "
        "X are A, C, G, T, U or IUPAC codes); to embed the peptides of its reads, use "
        "translate=six-frame, or as_protein=True for proteins made only of these letters"
    )


@pytest.mark.parametrize("name", ["scaffold of N runs", "IUPAC consensus"])
def test_n_rich_and_iupac_files_are_refused_and_as_protein_reads_them(tmp_path, name):
    path = tmp_path / "reads.fa"
    path.write_bytes(fasta([("r1", NUCLEOTIDES[name]), ("r2", NUCLEOTIDES[name][::-1])], 60))
    with pytest.raises(VirnucError) as error:
        build_index([path])
    assert str(error.value).startswith(f"{path} holds nucleotide sequences, not proteins")
    assert "as_protein=True" in str(error.value)
    index = build_index([path], as_protein=True)
    assert read_sequences(index, [0, 1]) == [
        NUCLEOTIDES[name].encode(),
        NUCLEOTIDES[name][::-1].encode(),
    ]


def test_a_long_leading_gap_does_not_hide_the_bases(tmp_path):
    """N is left out of the sample: a first megabase of N still leaves the bases to judge."""
    from virnuc_dask.inputs.nucleotide import SAMPLE_LETTERS

    path = tmp_path / "scaffold.fa"
    path.write_bytes(fasta([("s1", "N" * (SAMPLE_LETTERS + 1) + NUCLEOTIDES["random DNA"])], 80))
    with pytest.raises(VirnucError, match="holds nucleotide sequences"):
        build_index([path])


def test_as_protein_is_a_setting_of_a_run(tmp_path):
    path = tmp_path / "scaffolds.fa"
    path.write_bytes(fasta([("s1", NUCLEOTIDES["scaffold of N runs"])], 60))
    config = EmbedConfig.from_settings(model="esm2_t6_8M_UR50D")
    assert config.as_protein is False
    with pytest.raises(VirnucError, match="holds nucleotide sequences"):
        index_inputs([path], tmp_path / "staging", config)
    config = EmbedConfig.from_settings(model="esm2_t6_8M_UR50D", as_protein=True)
    index, reads = index_inputs([path], tmp_path / "staging", config)
    assert index.ids() == ["s1"] and reads is None
    with pytest.raises(VirnucError) as error:
        EmbedConfig.from_settings(model="esm2_t6_8M_UR50D", as_protein=True, translate="six-frame")
    assert str(error.value) == "as_protein=True applies to proteins: drop translate=six-frame"
