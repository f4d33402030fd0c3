"""In-run deduplication: each distinct sequence embedded once, the output as without it.

Whole runs on a real ``LocalCluster`` of worker processes with the tiny model: the output of
a run with duplicates (within a file, across files, differing only in case or line breaks,
and duplicate reads of a run on reads) must equal, bit for bit, the output of the same run
with ``dedup=False``, which embeds every row.

The runs give each sequence a batch of its own (``tokens_per_batch=1``): the engines are not
batch-invariant (a sequence batched with others differs in its last bits, 2e-7 relative on
the CPU's fp32, as it does between two runs with other chunk sizes), and these tests compare
bits, so that a row given another row's values cannot pass.
"""

from __future__ import annotations

import numpy as np
import pytest

import virnuc_dask
from tests.helpers import TINY, random_sequences, write_fasta
from virnuc_dask.output import residues_of


def _run(client, inputs, out, **settings):
    job = virnuc_dask.prepare(
        inputs,
        out,
        client=client,
        model=TINY,
        random_weights=True,
        chunk_tokens=3_000,
        tokens_per_batch=1,
        **settings,
    )
    path = job.run(client, progress=False)
    return job, virnuc_dask.open_embeddings(path).load()


def _differences(a, b) -> list[str]:
    """What differs between two outputs: ids, order, variables and values, bit for bit."""
    said = []
    if list(a.sequence.values) != list(b.sequence.values):
        said.append("ids")
    for name in sorted(set(a.data_vars) | set(b.data_vars)):
        if name in ("residue_start", "residue_embedding"):
            continue  # compared per sequence
        if name not in a or name not in b:
            said.append(f"{name} missing")
        elif not np.array_equal(a[name].values, b[name].values, equal_nan=True):
            said.append(name)
    if "residue_start" in a:
        for ident in a.sequence.values:
            if not np.array_equal(residues_of(a, ident).values, residues_of(b, ident).values):
                said.append(f"residues of {ident}")
                break
    return said


@pytest.fixture(scope="module")
def proteins(tmp_path_factory):
    """Two files: repeats inside the first, across the two, in lower case, other line breaks."""
    folder = tmp_path_factory.mktemp("dedup")
    distinct = random_sequences(30, 20, 300, seed=5) + random_sequences(2, 1100, 1300, seed=6)
    rng = np.random.default_rng(3)
    first = distinct + [distinct[int(i)] for i in rng.integers(0, len(distinct), 12)]
    second = [distinct[int(i)].lower() for i in rng.integers(0, len(distinct), 10)]
    second += random_sequences(5, 20, 300, seed=7) + [distinct[31]]
    one, two = folder / "one.fasta", folder / "two.fasta"
    write_fasta(one, first, [f"a{i}" for i in range(len(first))])
    write_fasta(two, second, [f"b{i}" for i in range(len(second))], width=17)
    return [str(one), str(two)], len(first) + len(second), len(distinct) + 5


def test_duplicates_are_embedded_once_and_the_output_is_unchanged(
    cluster_client, proteins, tmp_path
):
    inputs, rows, distinct = proteins
    job, deduped = _run(cluster_client, inputs, tmp_path / "dedup.h5")
    plain_job, plain = _run(cluster_client, inputs, tmp_path / "plain.h5", dedup=False)
    assert len(job.partition.order) == distinct < rows == len(plain_job.partition.order)
    assert job.report.sequences == rows and job.report.distinct == distinct
    share = (rows - distinct) / rows
    assert job.report.summary().startswith(
        f"{rows} sequences, {distinct} distinct ({share:.1%} duplicates), "
    )
    assert deduped.attrs["distinct_sequences"] == distinct
    assert _differences(deduped, plain) == []
    # The check sees a wrong row: the source of a duplicate perturbed, or two ids swapped.
    source = int(job.sources[np.flatnonzero(job.sources != np.arange(rows))[0]])
    perturbed = deduped.copy(deep=True)
    perturbed.embedding.values[source, 0] += np.float32(1e-6)
    assert _differences(perturbed, plain) == ["embedding"]
    swapped = deduped.copy(deep=True)
    swapped.embedding.values[[source, source + 1]] = swapped.embedding.values[[source + 1, source]]
    assert _differences(swapped, plain) == ["embedding"]


def test_per_residue_duplicates_share_their_sources_rows(cluster_client, proteins, tmp_path):
    inputs, rows, distinct = proteins
    job, deduped = _run(cluster_client, inputs, tmp_path / "dedup.h5", per_residue=True)
    _, plain = _run(cluster_client, inputs, tmp_path / "plain.h5", per_residue=True, dedup=False)
    assert _differences(deduped, plain) == []
    start = deduped.residue_start.values
    assert np.array_equal(start, start[job.sources])
    # No bytes stored twice: the deduplicated file holds fewer residue rows.
    counts = np.minimum(deduped.length.values, 1022)
    assert deduped.sizes["residue"] < plain.sizes["residue"]
    distinct_residues = counts[np.flatnonzero(job.sources == np.arange(rows))].sum()
    assert (
        distinct_residues
        <= deduped.sizes["residue"]
        < distinct_residues + 1024 * len(job.partition.chunks)
    )


def test_duplicate_reads_are_embedded_once(cluster_client, tmp_path):
    rng = np.random.default_rng(9)
    bases = np.frombuffer(b"ACGT", dtype=np.uint8)
    reads = [bases[rng.integers(0, 4, int(rng.integers(150, 400)))].tobytes() for _ in range(40)]
    reads += [reads[int(i)] for i in rng.integers(0, 40, 25)]  # duplicate reads
    path = tmp_path / "reads.fq"
    path.write_bytes(
        b"".join(b"@r%d\n%s\n+\n%s\n" % (i, r, b"I" * len(r)) for i, r in enumerate(reads))
    )
    settings = dict(translate="six-frame", frames="orfs", min_peptide=20)
    job, deduped = _run(cluster_client, [str(path)], tmp_path / "dedup.h5", **settings)
    _, plain = _run(cluster_client, [str(path)], tmp_path / "plain.h5", dedup=False, **settings)
    assert job.distinct < len(job.index)
    assert _differences(deduped, plain) == []
    assert list(deduped.read.values) == list(plain.read.values)


def test_a_resumed_run_keeps_the_sources_it_resumes(cluster_client, proteins, tmp_path):
    """Resumed with dedup=False, a deduplicated run's shards are reused as they are: the
    partition and the sources are the saved ones, and the output is the same."""
    inputs, rows, distinct = proteins
    out = tmp_path / "out.h5"
    first_job, first = _run(cluster_client, inputs, tmp_path / "first.h5")
    settings = dict(model=TINY, random_weights=True, chunk_tokens=3_000, tokens_per_batch=1)
    job = virnuc_dask.prepare(inputs, out, client=cluster_client, **settings)
    job.run(cluster_client, progress=False, cleanup=False)
    job.release()  # the work directory stays, as after an interrupt
    out.unlink()
    resumed = virnuc_dask.prepare(
        inputs, out, client=cluster_client, resume=True, dedup=False, **settings
    )
    assert len(resumed.reused) == len(resumed.partition.chunks) and not resumed.todo
    assert np.array_equal(resumed.sources, first_job.sources)
    resumed.run(cluster_client, progress=False)
    assert _differences(virnuc_dask.open_embeddings(out).load(), first) == []
