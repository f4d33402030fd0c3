"""Shards and assembly: input order, every id once, alignment proven, files xarray opens."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

from virnuc_dask.output import ShardInfo, assemble, open_embeddings, shard_matches, write_shard

IDS = [f"P{i:05d}" for i in range(50)]
LENGTHS = np.arange(50) * 30


def _shards(tmp_path, embedding, splits, ids=IDS, fingerprint="fp"):
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ids))
    shards = []
    for number, rows in enumerate(np.array_split(order, splits)):
        path = tmp_path / f"shard-{number}.h5"
        write_shard(
            path,
            rows=rows,
            ids=[ids[r] for r in rows],
            embedding=embedding[rows],
            fingerprint=fingerprint,
        )
        shards.append(ShardInfo(number, str(path), len(rows), 0, "w", 0.0))
    return shards


def _assemble(tmp_path, shards, layers=(2,), **kwargs):
    return assemble(
        shards,
        ids=IDS,
        lengths=LENGTHS,
        max_residues=1022,
        layers=list(layers),
        output=tmp_path / "out.h5",
        staging=tmp_path / "stage",
        attrs={"model": "m"},
        **kwargs,
    )


def test_assembles_in_input_order_and_opens_without_warnings(tmp_path):
    embedding = np.random.default_rng(1).normal(size=(50, 1, 16)).astype(np.float32)
    _assemble(tmp_path, _shards(tmp_path, embedding, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_dataset(tmp_path / "out.h5", engine="h5netcdf").load()
    assert ds.embedding.dims == ("sequence", "feature")
    assert ds.embedding.dtype == np.float32
    assert list(ds.sequence.values) == IDS
    np.testing.assert_array_equal(ds.embedding.values, embedding[:, 0])
    np.testing.assert_array_equal(ds.sel(sequence="P00007").embedding.values, embedding[7, 0])
    assert ds.truncated.dtype == bool and ds.truncated.values.tolist() == (LENGTHS > 1022).tolist()
    assert ds.length.values.tolist() == LENGTHS.tolist()
    assert ds.attrs["model"] == "m"


def test_several_layers_float16_and_zarr_hold_the_same_content(tmp_path):
    embedding = np.random.default_rng(2).normal(size=(50, 3, 8)).astype(np.float32)
    shards = _shards(tmp_path, embedding, 3)
    _assemble(tmp_path, shards, layers=(0, 1, 2), dtype="float16", zarr_path=tmp_path / "o.zarr")
    h5 = open_embeddings(tmp_path / "out.h5")
    zr = open_embeddings(tmp_path / "o.zarr")
    assert h5.embedding.dims == ("sequence", "layer", "feature")
    assert h5.embedding.dtype == np.float16
    assert h5.layer.values.tolist() == [0, 1, 2]
    np.testing.assert_allclose(h5.embedding.values, embedding, rtol=1e-3, atol=1e-3)
    xr.testing.assert_identical(h5.load(), zr.load())


def test_missing_shard_is_refused_and_no_file_appears(tmp_path):
    embedding = np.ones((50, 1, 4), np.float32)
    shards = _shards(tmp_path, embedding, 4)
    with pytest.raises(RuntimeError, match="missing"):
        _assemble(tmp_path, shards[:-1])
    assert not (tmp_path / "out.h5").exists()
    assert not list(tmp_path.glob(".out.h5*"))


def test_shard_counted_twice_is_refused(tmp_path):
    shards = _shards(tmp_path, np.ones((50, 1, 4), np.float32), 4)
    with pytest.raises(RuntimeError, match="more than once"):
        _assemble(tmp_path, shards + [ShardInfo(9, shards[0].path, 0, 0, "w", 0.0)])
    assert not (tmp_path / "out.h5").exists()


def test_misaligned_shard_is_refused(tmp_path):
    embedding = np.ones((50, 1, 4), np.float32)
    rows = np.arange(50)
    shuffled = list(IDS)
    shuffled[3], shuffled[4] = shuffled[4], shuffled[3]
    write_shard(tmp_path / "s.h5", rows=rows, ids=shuffled, embedding=embedding, fingerprint="f")
    with pytest.raises(RuntimeError, match="misaligned"):
        _assemble(tmp_path, [ShardInfo(0, str(tmp_path / "s.h5"), 50, 0, "w", 0.0)])


def test_shard_matches_only_its_own_run_and_rows(tmp_path):
    rows = np.array([4, 2, 9])
    path = tmp_path / "s.h5"
    write_shard(
        path, rows=rows, ids=["a", "b", "c"], embedding=np.zeros((3, 1, 2)), fingerprint="run-1"
    )
    assert shard_matches(path, "run-1", rows)
    assert not shard_matches(path, "run-2", rows)
    assert not shard_matches(path, "run-1", rows[::-1])
    path.write_bytes(path.read_bytes()[:100])  # a half-written file
    assert not shard_matches(path, "run-1", rows)
