"""Whole runs on reads: a ``LocalCluster`` of worker processes, and the command line.

The expected peptides are computed here with Biopython, independently of the package; the run's
embeddings must equal fair-esm's own embeddings of those peptides, row by row at 1e-5 (a
misaligned row is caught: random-weight embeddings of different sequences differ far more).
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess

import numpy as np
import pytest
from Bio.Seq import Seq

import virnuc_dask
from tests.helpers import CLI, TINY, assert_rows_close, fair_esm_embeddings

FRAMES = ("F1", "F2", "F3", "R1", "R2", "R3")


def _reads() -> list[tuple[str, str]]:
    """60 reads of 40-160 bases: some N, some lower case, some RNA, one of N only."""
    rng = random.Random(7)
    reads = []
    for i in range(59):
        bases = "".join(rng.choices("ACGT", k=rng.randint(40, 160)))
        if i % 5 == 0:
            bases = bases.lower()
        if i % 7 == 0:
            bases = bases.replace("T", "U").replace("t", "u")
        if i % 4 == 0:
            at = rng.randrange(len(bases))
            bases = bases[:at] + "N" + bases[at + 1 :]
        reads.append((f"read_{i}", bases))
    reads.append(("all_n", "N" * 90))
    return reads


def _expected(reads) -> list[dict]:
    """Every kept stop-free frame, by Biopython: id, peptide, read, frame, bases."""
    out = []
    for ident, bases in reads:
        dna = bases.upper().replace("U", "T")
        strands = (dna, str(Seq(dna).reverse_complement()))
        for f, name in enumerate(FRAMES):
            offset = f % 3
            codons = strands[f // 3][offset:][: (len(dna) - offset) // 3 * 3]
            protein = "".join(
                "X" if "N" in codons[3 * k : 3 * k + 3] else letter
                for k, letter in enumerate(str(Seq(codons).translate()))
            )
            if not protein or "*" in protein or set(protein) == {"X"}:
                continue
            end = offset + len(codons) if f < 3 else len(dna) - offset
            out.append(
                {
                    "id": ident + name,
                    "peptide": protein,
                    "read": ident,
                    "frame": name,
                    "strand": "+" if f < 3 else "-",
                    "nt_start": end - len(codons),
                    "nt_end": end,
                }
            )
    return out


@pytest.fixture(scope="module")
def reads_files(tmp_path_factory):
    reads = _reads()
    folder = tmp_path_factory.mktemp("reads")
    fastq = folder / "reads.fastq"
    fastq.write_text("".join(f"@{i} sample\n{s}\n+\n{'+' * len(s)}\n" for i, s in reads))
    fasta = folder / "reads.fa.gz"
    fasta.write_bytes(gzip.compress("".join(f">{i}\n{s}\n" for i, s in reads).encode()))
    return reads, fastq, fasta


@pytest.fixture(scope="module")
def fastq_run(cluster_client, reads_files, tmp_path_factory):
    _, fastq, _ = reads_files
    out = tmp_path_factory.mktemp("fastq") / "reads.h5"
    job = virnuc_dask.prepare(
        [fastq],
        out,
        client=cluster_client,
        model=TINY,
        random_weights=True,
        translate="six-frame",
        chunk_tokens=600,
    )
    path = job.run(cluster_client, progress=False)
    return job, virnuc_dask.open_embeddings(path).load()


def test_a_run_on_reads_equals_embedding_the_peptides(fastq_run, reads_files, tiny_model):
    job, ds = fastq_run
    reads, _, _ = reads_files
    expected = _expected(reads)
    assert len(job.partition.chunks) > 2  # several chunks, on two worker processes
    assert ds.sequence.values.tolist() == [e["id"] for e in expected]
    for name in ("read", "frame", "strand", "nt_start", "nt_end"):
        assert ds[name].values.tolist() == [e[name] for e in expected], name
    assert ds.length.values.tolist() == [len(e["peptide"]) for e in expected]
    reference = fair_esm_embeddings(tiny_model, [e["peptide"] for e in expected], [2])[:, 0]
    assert_rows_close(ds.embedding.values, reference)
    # Each read's peptides together: ds.groupby("read"), as the README shows.
    per_read = ds.embedding.groupby("read").mean()
    assert sorted(per_read.read.values.tolist()) == sorted({e["read"] for e in expected})


def test_the_report_and_attributes_count_reads_without_peptides(fastq_run, reads_files):
    job, ds = fastq_run
    reads, _, _ = reads_files
    kept = {e["read"] for e in _expected(reads)}
    without = [ident for ident, _ in reads if ident not in kept]
    assert "all_n" in without
    assert ds.attrs["translate"] == "six-frame" and ds.attrs["frames"] == "stop-free"
    assert ds.attrs["genetic_code"] == 1 and ds.attrs["min_peptide"] == 1
    assert ds.attrs["reads"] == len(reads)
    assert ds.attrs["reads_without_peptides"] == len(without)
    assert json.loads(ds.attrs["reads_without_peptides_first"]) == without[:10]
    assert job.report.reads == len(reads)
    assert f"{len(reads)} reads, {len(without)} with no kept frame ({without[0]}, " in (
        job.report.summary()
    )


def test_fastq_and_fasta_of_the_same_reads_give_the_same_file(
    fastq_run, cluster_client, reads_files, tmp_path
):
    """The FASTA (gzip) run goes through the delayed graph on the client (its reduction task
    assembles the file and the Zarr store), the FASTQ run through ``job.run``'s streaming."""
    _, from_fastq = fastq_run
    _, _, fasta = reads_files
    out, store = tmp_path / "reads.h5", tmp_path / "reads.zarr"
    job = virnuc_dask.prepare(
        [fasta],
        out,
        zarr=store,
        client=cluster_client,
        model=TINY,
        random_weights=True,
        translate="six-frame",
        chunk_tokens=600,
    )
    try:
        assert cluster_client.compute(job.graph()).result() == str(out)
    finally:
        job.finish(success=True)
    for path in (out, store):
        ds = virnuc_dask.open_embeddings(path).load()
        for name in ("sequence", "read", "frame", "strand", "nt_start", "nt_end", "length"):
            assert ds[name].values.tolist() == from_fastq[name].values.tolist(), name
        np.testing.assert_array_equal(ds.embedding.values, from_fastq.embedding.values)
        # Attributes: all but the run's own (the graph's reduction records no phases); the
        # store keeps numbers as JSON (lists).
        differ = {"run", "created", "inputs", "fingerprint", "phases"}
        assert set(ds.attrs) - differ == set(from_fastq.attrs) - differ
        for name in set(ds.attrs) - differ:
            assert np.array_equal(np.ravel(ds.attrs[name]), np.ravel(from_fastq.attrs[name]))


def test_command_line_with_pieces_and_orfs(tmp_path):
    rng = random.Random(11)
    reads = [
        (f"contig_{i}", "".join(rng.choices("ACGT", k=rng.randint(150, 400)))) for i in range(8)
    ]
    fastq = tmp_path / "contigs.fq.gz"
    fastq.write_bytes(
        gzip.compress("".join(f"@{i}\n{s}\n+\n{'I' * len(s)}\n" for i, s in reads).encode())
    )
    out = tmp_path / "contigs.h5"
    result = subprocess.run(
        [*CLI, "embed", str(fastq), "-o", str(out), "--model", TINY, "--random-weights",
         "--workers", "1", "--translate", "six-frame", "--split-bp", "120", "--frames", "orfs",
         "--min-peptide", "8", "--genetic-code", "11"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 reads, 0 with no kept frame" in result.stderr
    ds = virnuc_dask.open_embeddings(out)
    ids = ds.sequence.values.tolist()
    assert all("_chunk_" in i and "_orf_" in i for i in ids)
    assert ds.attrs["split_bp"] == 120 and ds.attrs["genetic_code"] == 11
    piece = ds.piece.values
    assert piece.min() == 1 and piece.max() == 4  # 400 bases: 4 pieces of 120
    contig = dict(reads)
    for row in range(0, len(ids), 7):
        # The peptide's bases, found from its coordinates, translate to its letters.
        bases = contig[ds.read.values[row]]
        start = int(ds.piece_start.values[row])
        part = bases[start + int(ds.nt_start.values[row]) : start + int(ds.nt_end.values[row])]
        if ds.strand.values[row] == "-":
            part = str(Seq(part).reverse_complement())
        assert len(part) // 3 == int(ds.length.values[row]) >= 8
        assert "*" not in str(Seq(part).translate(table=11))
        assert ids[row].startswith(f"{ds.read.values[row]}_chunk_{ds.piece.values[row]}")
