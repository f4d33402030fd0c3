"""Whole runs on real ``LocalCluster``s of worker processes, compared row by row.

Ported from the multi-GPU suite of VirNucPro's refactor to CPU worker processes, with
tolerances that see a misaligned row: random-weight embeddings of different sequences reach
cosine 0.991 with each other, so rows are compared to a reference at 1e-5 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
from distributed import Client, LocalCluster

import virnuc_dask
from tests.helpers import (
    TINY,
    assert_rows_close,
    fair_esm_embeddings,
    random_sequences,
    write_fasta,
)


def _cluster(workers: int):
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
    )
    return cluster, Client(cluster)


def _run(client, fasta, out, **settings):
    job = virnuc_dask.prepare(
        [fasta],
        out,
        client=client,
        model=TINY,
        random_weights=True,
        **settings,
    )
    path = job.run(client, progress=False)
    return job, virnuc_dask.open_embeddings(path).load()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """120 sequences of 1 to 1,300 residues (some truncated) in one multi-line FASTA file."""
    seqs = random_sequences(110, 20, 400, seed=11) + random_sequences(10, 1, 1300, seed=12)
    path = tmp_path_factory.mktemp("corpus") / "corpus.fasta"
    ids = write_fasta(path, seqs)
    return path, ids, seqs


@pytest.fixture(scope="module")
def reference(corpus, tiny_model):
    _, _, seqs = corpus
    return fair_esm_embeddings(tiny_model, seqs, [2])[:, 0]


@pytest.fixture(scope="module")
def two_worker_run(cluster_client, corpus, tmp_path_factory):
    fasta, _, _ = corpus
    out = tmp_path_factory.mktemp("two") / "out.h5"
    return _run(cluster_client, fasta, out, chunk_tokens=2_000)


def test_multi_worker_output_equals_fair_esm(two_worker_run, corpus, reference):
    _, ds = two_worker_run
    _, ids, _ = corpus
    assert list(ds.sequence.values) == ids
    assert_rows_close(ds.embedding.values, reference)


def test_every_sequence_once_in_input_order(two_worker_run, corpus):
    job, ds = two_worker_run
    _, ids, seqs = corpus
    assert len(ds.sequence) == len(set(ds.sequence.values)) == len(ids)
    assert list(ds.sequence.values) == ids
    assert ds.length.values.tolist() == [len(s) for s in seqs]
    assert ds.truncated.values.tolist() == [len(s) > 1022 for s in seqs]
    assert job.report.sequences == len(ids)


def test_shapes_dtypes_and_attributes(two_worker_run):
    _, ds = two_worker_run
    assert ds.embedding.dims == ("sequence", "feature")
    assert ds.embedding.shape == (120, 64) and ds.embedding.dtype == np.float32
    assert ds.attrs["model"] == TINY and ds.attrs["random_weights"] == "yes"
    assert ds.attrs["pooling"] == "mean over residues, BOS/EOS excluded"
    assert ds.attrs["compute_dtype"] == "fp32"


def test_stride_partition_is_balanced_and_both_workers_work(two_worker_run):
    job, _ = two_worker_run
    assert job.partition.lanes == 2  # one lane per worker of the client
    lanes = job.partition.lane_tokens()
    assert np.abs(lanes / lanes.mean() - 1).max() < 0.10
    assert len(job.report.worker_tokens) == 2
    assert sum(job.report.worker_tokens.values()) == lanes.sum()


def test_shard_sizes_are_similar(two_worker_run):
    job, _ = two_worker_run
    last = {c.lane: c.number for c in job.partition.chunks}
    full = [c.tokens for c in job.partition.chunks if c.number not in last.values()]
    assert len(full) >= 4
    assert max(full) / min(full) < 1.5  # each chunk is cut at the first sequence past 2,000


def test_work_directory_is_removed_after_success(two_worker_run):
    job, _ = two_worker_run
    assert not job.work_dir.exists()


@pytest.mark.parametrize(("workers", "count"), [(1, 40), (4, 2), (3, 99)])
def test_worker_and_sequence_counts(workers, count, tmp_path, tiny_model):
    seqs = random_sequences(count, 1, 300, seed=workers * 100 + count)
    fasta = tmp_path / "in.fasta"
    ids = write_fasta(fasta, seqs)
    cluster, client = _cluster(workers)
    with cluster, client:
        _, ds = _run(client, fasta, tmp_path / "out.h5", chunk_tokens=500)
    assert list(ds.sequence.values) == ids
    assert_rows_close(ds.embedding.values, fair_esm_embeddings(tiny_model, seqs, [2])[:, 0])


def test_one_worker_equals_two_workers(two_worker_run, corpus, tmp_path):
    fasta, _, _ = corpus
    _, two = two_worker_run
    cluster, client = _cluster(1)
    with cluster, client:
        _, one = _run(client, fasta, tmp_path / "one.h5", chunk_tokens=5_000)
    assert list(one.sequence.values) == list(two.sequence.values)
    assert_rows_close(one.embedding.values, two.embedding.values)


def test_several_layers_and_zarr(cluster_client, corpus, tmp_path, tiny_model):
    fasta, ids, seqs = corpus
    job = virnuc_dask.prepare(
        [fasta],
        tmp_path / "l.h5",
        lanes=2,
        model=TINY,
        random_weights=True,
        layers=[0, 2],
        zarr=tmp_path / "l.zarr",
    )
    job.run(cluster_client, progress=False)
    h5 = virnuc_dask.open_embeddings(tmp_path / "l.h5").load()
    zr = virnuc_dask.open_embeddings(tmp_path / "l.zarr").load()
    assert h5.embedding.dims == ("sequence", "layer", "feature")
    assert h5.layer.values.tolist() == [0, 2]
    assert_rows_close(h5.embedding.values, fair_esm_embeddings(tiny_model, seqs, [0, 2]))
    np.testing.assert_array_equal(zr.embedding.values, h5.embedding.values)
    assert list(zr.sequence.values) == ids


def test_the_graph_computed_on_a_users_client_writes_the_same_file_as_run(
    corpus, reference, cluster_client, tmp_path
):
    import dask
    from distributed import get_task_stream

    fasta, ids, _ = corpus
    files = {}
    for how in ("run", "client.compute", "dask.compute"):
        out = tmp_path / f"{how}.h5"
        job = virnuc_dask.prepare(
            [fasta], out, client=cluster_client, model=TINY, random_weights=True
        )
        graph = job.graph()
        if how == "run":
            # run() computes the graph it is given, the one a notebook draws: every task that
            # ran is one of its keys, and every key ran.
            with get_task_stream(cluster_client) as stream:
                assert job.run(cluster_client, progress=False, graph=graph) == out
            ran = {t["key"] for t in stream.data if str(t["key"]).startswith("embed-chunk-")}
            assert ran == set(graph.__dask_keys__()) and len(ran) == len(job.partition.chunks)
        else:
            try:
                if how == "client.compute":
                    path = cluster_client.compute(graph).result()
                else:
                    (path,) = dask.compute(graph)
            finally:
                job.finish(success=True)
            assert path == str(out)
        files[how] = virnuc_dask.open_embeddings(out).load()
    for how, ds in files.items():
        assert list(ds.sequence.values) == ids, how
        assert_rows_close(ds.embedding.values, reference)
        np.testing.assert_array_equal(ds.embedding.values, files["run"].embedding.values)
        np.testing.assert_array_equal(ds.length.values, files["run"].length.values)


def test_per_residue_with_windows_on_the_cluster_and_in_zarr(cluster_client, tmp_path, tiny_model):
    from tests.helpers import collect_residues, fair_esm_residues
    from virnuc_dask.engine.reference import ReferenceEngine

    # Windows of 100 residues keep the test quick; the rule is the same as for 1,022.
    seqs = random_sequences(40, 1, 100, seed=13) + [
        random_sequences(1, n, n, seed=n)[0] for n in (101, 160, 260)
    ]
    fasta = tmp_path / "r.fasta"
    ids = write_fasta(fasta, seqs)
    job = virnuc_dask.prepare(
        [fasta],
        tmp_path / "r.h5",
        lanes=2,
        model=TINY,
        random_weights=True,
        per_residue=True,
        residue_dtype="float32",
        long="window",
        max_residues=100,
        chunk_tokens=800,
        zarr=tmp_path / "r.zarr",
    )
    job.run(cluster_client, progress=False)
    h5 = virnuc_dask.open_embeddings(tmp_path / "r.h5")
    zr = virnuc_dask.open_embeddings(tmp_path / "r.zarr")
    assert list(h5.sequence.values) == ids and not h5.truncated.values.any()
    long = [i for i, s in enumerate(seqs) if len(s) > 100]
    assert h5.windows.values[long].tolist() == [2, 3, 5]
    assert h5.attrs["long"] == "window" and h5.attrs["per_residue"] == "yes"
    # Windowed sequences against the reference engine here; the others against fair-esm.
    local = ReferenceEngine(tiny_model, layers=[2], max_residues=100)
    _, windowed = collect_residues(
        local, [seqs[i].encode() for i in long], long="window", residue_dtype="float32"
    )
    for i in [*long, 0, 1, 17, 39]:
        rows = virnuc_dask.residues_of(h5, ids[i])
        assert rows.dims == ("position", "feature") and rows.sizes["position"] == len(seqs[i])
        expected = (
            windowed[long.index(i)][:, 0]
            if i in long
            else fair_esm_residues(tiny_model, seqs[i], [2])[:, 0]
        )
        assert_rows_close(rows.values, expected)
        # The pooled vector is the mean of the (blended) residues.
        assert_rows_close(h5.embedding.values[i][None], rows.values.mean(0)[None])
        np.testing.assert_array_equal(virnuc_dask.residues_of(zr, ids[i]).values, rows.values)
    # A shuffled id points at another sequence's rows, and fails the same comparison.
    n = min(len(seqs[1]), len(seqs[2]))
    other = virnuc_dask.residues_of(h5, ids[2]).values[:n]
    with pytest.raises(AssertionError):
        assert_rows_close(other, fair_esm_residues(tiny_model, seqs[1], [2])[:n, 0])
