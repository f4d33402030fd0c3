"""Shards and assembly: input order, every id once, alignment proven, files xarray opens.

The writer fills the file as shards arrive, in any order, and the output path holds nothing
until it is complete.

Also the output side's safety rules: foreign shards refused, a full disk reported as one error
with the partial files removed (on a real, small tmpfs), existing outputs replaced only when
asked and only once the new one is complete, and ids read back without fixed-width strings.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import uuid
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
import zarr

from virnuc_dask.errors import VirnucError
from virnuc_dask.output import (
    DiskFull,
    OutputWriter,
    ShardInfo,
    ShardMismatch,
    assemble,
    check_target,
    open_embeddings,
    remove_stale_partials,
    shard_matches,
    write_shard,
)
from virnuc_dask.storage import ownership

IDS = [f"P{i:05d}" for i in range(50)]
LENGTHS = np.arange(50) * 30


def _shards(tmp_path, embedding, splits, ids=IDS, fingerprint="fp", layers=None, dtype="float32"):
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ids))
    shards = []
    # Shards record their layers only when told them, as callers that predate layers do.
    recorded = {"layers": layers} if layers is not None else {}
    for number, rows in enumerate(np.array_split(order, splits)):
        path = tmp_path / f"shard-{number}.h5"
        write_shard(
            path,
            rows=rows,
            ids=[ids[r] for r in rows],
            embedding=embedding[rows],
            fingerprint=fingerprint,
            dtype=dtype,
            **recorded,
        )
        shards.append(ShardInfo(number, str(path), len(rows), 0, "w", 0.0))
    return shards


def _assemble(tmp_path, shards, layers=(2,), **kwargs):
    kwargs = {"output": tmp_path / "out.h5", **kwargs}
    return assemble(
        shards,
        ids=kwargs.pop("ids", IDS),
        lengths=kwargs.pop("lengths", LENGTHS),
        max_residues=1022,
        layers=list(layers),
        attrs=kwargs.pop("attrs", {"model": "m"}),
        **kwargs,
    )


def _writer(tmp_path, layers=(2,), width=4, **kwargs):
    kwargs = {"output": tmp_path / "out.h5", **kwargs}
    return OutputWriter(
        ids=kwargs.pop("ids", IDS),
        lengths=kwargs.pop("lengths", LENGTHS),
        max_residues=1022,
        layers=list(layers),
        width=width,
        attrs=kwargs.pop("attrs", {"model": "m"}),
        **kwargs,
    )


def _assert_holds(path, embedding, ids=IDS):
    """The file at ``path`` holds ``embedding`` (rows, layers, width) for ``ids``, bit for bit."""
    ds = open_embeddings(path)
    assert list(ds.sequence.values) == list(ids)
    values = ds.embedding.values
    np.testing.assert_array_equal(values.reshape(embedding.shape), embedding)
    assert values.dtype == embedding.dtype


def _files(folder):
    """Every file under ``folder`` (folders themselves excluded), relative names."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


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
    shards = _shards(tmp_path, embedding, 3, dtype="float16")
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


# --- Writing as shards arrive --------------------------------------------------------------


def test_shards_added_in_random_order_give_the_same_file_as_sorted(tmp_path):
    embedding = np.random.default_rng(8).normal(size=(50, 3, 8)).astype(np.float32)
    shards = _shards(tmp_path, embedding, 7)
    shuffled = [shards[i] for i in np.random.default_rng(9).permutation(len(shards))]
    assert [s.chunk for s in shuffled] != sorted(s.chunk for s in shuffled)
    paths = []
    for name, order in (("sorted.h5", shards), ("shuffled.h5", shuffled)):
        with _writer(tmp_path, layers=(0, 1, 2), width=8, output=tmp_path / name) as writer:
            for shard in order:
                writer.add(shard)
            paths.append(writer.close())
    _assert_holds(paths[0], embedding)
    _assert_holds(paths[1], embedding)
    xr.testing.assert_identical(open_embeddings(paths[0]).load(), open_embeddings(paths[1]).load())
    # Nothing in the file depends on the order: not even one byte.
    assert Path(paths[0]).read_bytes() == Path(paths[1]).read_bytes()


def test_the_output_path_holds_nothing_until_the_file_is_complete(tmp_path):
    embedding = np.random.default_rng(10).normal(size=(50, 1, 4)).astype(np.float32)
    shards = _shards(tmp_path, embedding, 4)
    output = tmp_path / "out.h5"
    with _writer(tmp_path) as writer:
        for count, shard in enumerate(shards):
            # A reader at the output path finds nothing while the file is being written ...
            assert not output.exists()
            with pytest.raises(VirnucError, match="no embedding file"):
                open_embeddings(output)
            # ... while the file being written is a hidden sibling, already complete in its
            # layout: xarray opens it without a warning.
            assert re.fullmatch(r"\.out\.h5\.[0-9a-f]{32}\.partial", writer.partial.name)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with xr.open_dataset(writer.partial, engine="h5netcdf") as partial:
                    assert partial.embedding.shape == (50, 4)
                    assert list(partial.sequence.values) == IDS
            if count == 2:
                assert _files(tmp_path).count(writer.partial.name) == 1
            writer.add(shard)
        assert not output.exists()
        writer.close()
    _assert_holds(output, embedding)
    assert not list(tmp_path.glob(".out.h5*"))


def test_a_shard_with_shuffled_ids_is_refused_and_nothing_of_it_written(tmp_path):
    embedding = np.random.default_rng(11).normal(size=(50, 1, 4)).astype(np.float32)
    shards = _shards(tmp_path, embedding, 2)
    rows = np.asarray(h5py.File(shards[1].path, "r")["rows"][:])
    # Every row's id moved to another row of the same shard, values left as they were.
    shuffled = [IDS[r] for r in np.roll(rows, 1)]
    bad = tmp_path / "shuffled.h5"
    write_shard(bad, rows=rows, ids=shuffled, embedding=embedding[rows], fingerprint="fp")
    with _writer(tmp_path) as writer:
        writer.add(shards[0])
        with pytest.raises(RuntimeError, match="misaligned"):
            writer.add(ShardInfo(1, str(bad), len(rows), 0, "w", 0.0))
        # Nothing of the refused shard is in the file; its rows still count as missing.
        values = np.memmap(writer.partial, dtype=np.float32, mode="r", offset=_offset(writer))
        assert not values[: 50 * 4].reshape(50, 4)[rows].any()
        del values
        with pytest.raises(RuntimeError, match=f"{len(rows)} sequences missing"):
            writer.close()
    assert not (tmp_path / "out.h5").exists() and not list(tmp_path.glob(".out.h5*"))


def _offset(writer):
    with h5py.File(writer.partial, "r") as f:
        return f["embedding"].id.get_offset()


def test_the_comparison_fails_on_a_perturbed_or_swapped_row(tmp_path):
    # The equality the tests of this file rely on: proven able to fail.
    embedding = np.random.default_rng(12).normal(size=(50, 1, 4)).astype(np.float32)
    output = _assemble(tmp_path, _shards(tmp_path, embedding, 3))
    _assert_holds(output, embedding)
    with h5py.File(output, "r+") as f:
        value = f["embedding"][17, 2]
        f["embedding"][17, 2] = np.nextafter(value, np.float32(np.inf))  # one ulp
    with pytest.raises(AssertionError):
        _assert_holds(output, embedding)
    with h5py.File(output, "r+") as f:
        f["embedding"][17, 2] = value
        f["embedding"][[3, 4]] = embedding[[4, 3], 0]
    with pytest.raises(AssertionError):
        _assert_holds(output, embedding)
    with h5py.File(output, "r+") as f:
        f["embedding"][[3, 4]] = embedding[[3, 4], 0]
    _assert_holds(output, embedding)


def test_values_are_one_contiguous_variable_in_the_file(tmp_path):
    embedding = np.random.default_rng(13).normal(size=(50, 3, 8)).astype(np.float16)
    shards = _shards(tmp_path, embedding, 3, dtype="float16")
    output = _assemble(tmp_path, shards, layers=(0, 1, 2), dtype="float16")
    with h5py.File(output, "r") as f:
        values = f["embedding"]
        assert values.chunks is None and values.compression is None
        offset = values.id.get_offset()
    # The bytes at that offset are the values, in input order: what the writer mapped.
    mapped = np.memmap(output, dtype=np.float16, mode="r", offset=offset, shape=(50, 3, 8))
    np.testing.assert_array_equal(mapped, embedding)
    _assert_holds(output, embedding)


def test_close_adds_attributes_to_the_file_and_the_store(tmp_path):
    embedding = np.random.default_rng(14).normal(size=(50, 1, 4)).astype(np.float32)
    store = tmp_path / "out.zarr"
    attrs = {"model": "m", "fingerprint": "fp", "phases": "none yet"}
    with _writer(tmp_path, attrs=attrs, zarr_path=store) as writer:
        for shard in _shards(tmp_path, embedding, 3):
            writer.add(shard)
        phases = json.dumps({"compute": 1.5, "assembly": 0.1})
        writer.close(extra_attrs={"phases": phases, "chunks": 3})
    for path in (tmp_path / "out.h5", store):
        ds = open_embeddings(path)
        assert ds.attrs["model"] == "m" and ds.attrs["phases"] == phases
        assert int(np.squeeze(ds.attrs["chunks"])) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xr.open_dataset(tmp_path / "out.h5", engine="h5netcdf").close()
    xr.testing.assert_identical(
        open_embeddings(tmp_path / "out.h5").load(), open_embeddings(store).load()
    )


def test_leaving_the_writer_without_close_removes_its_partial_file(tmp_path):
    shards = _shards(tmp_path, np.ones((50, 1, 4), np.float32), 2)
    with pytest.raises(KeyError), _writer(tmp_path) as writer:
        writer.add(shards[0])
        raise KeyError("the run failed")
    assert not list(tmp_path.glob(".out.h5*"))
    with _writer(tmp_path) as writer:
        writer.add(shards[0])
    assert not list(tmp_path.glob(".out.h5*")) and not (tmp_path / "out.h5").exists()
    writer.abort()  # again: nothing to do
    with pytest.raises(RuntimeError, match="aborted"):
        writer.add(shards[1])
    # After a successful close, abort leaves the output alone.
    writer = _writer(tmp_path)
    for shard in shards:
        writer.add(shard)
    writer.close()
    writer.abort()
    assert (tmp_path / "out.h5").exists() and not list(tmp_path.glob(".out.h5*"))
    with pytest.raises(RuntimeError, match="closed"):
        writer.close()


# --- Foreign shards -------------------------------------------------------------------------

#: (what differs, the foreign shard's (layers, width, dtype, fingerprint), the word expected in
#: the message). The run embeds layer 2 at width 4 in float32 under fingerprint "fp".
FOREIGN = {
    "fingerprint": (([2], 4, "float32", "another-run"), "fingerprint"),
    "width": (([2], 8, "float32", "fp"), "width"),
    "layer-count": (([1, 2], 4, "float32", "fp"), "layers"),
    "layer-numbers": (([5], 4, "float32", "fp"), "layers"),
    "dtype": (([2], 4, "float16", "fp"), "dtype"),
}


@pytest.mark.parametrize("case", FOREIGN, ids=list(FOREIGN))
def test_foreign_shard_is_refused_and_the_shards_are_kept(tmp_path, case):
    (layers, width, dtype, fingerprint), word = FOREIGN[case]
    embedding = np.ones((50, 1, 4), np.float32)
    shards = _shards(tmp_path, embedding, 4, layers=[2])
    rows = np.asarray(h5py.File(shards[1].path, "r")["rows"][:])
    write_shard(
        shards[1].path,
        rows=rows,
        ids=[IDS[r] for r in rows],
        embedding=np.ones((len(rows), len(layers), width)),
        fingerprint=fingerprint,
        layers=layers,
        dtype=dtype,
    )
    with pytest.raises(ShardMismatch, match=word) as caught:
        _assemble(tmp_path, shards, layers=[2], fingerprint="fp", width=4)
    message = str(caught.value)
    assert shards[1].path in message and "kept" in message
    assert isinstance(caught.value, VirnucError)
    assert all(os.path.exists(s.path) for s in shards)
    assert not (tmp_path / "out.h5").exists() and not list(tmp_path.glob(".out.h5*"))
    assert _files(tmp_path / "stage") == []


def test_shards_of_different_widths_are_refused_even_without_a_width(tmp_path):
    # Without a check, a width-1 shard broadcasts silently into every feature of its rows.
    shards = _shards(tmp_path, np.ones((50, 1, 4), np.float32), 2)
    rows = np.asarray(h5py.File(shards[1].path, "r")["rows"][:])
    write_shard(
        shards[1].path,
        rows=rows,
        ids=[IDS[r] for r in rows],
        embedding=np.ones((len(rows), 1, 1)),
        fingerprint="fp",
    )
    with pytest.raises(ShardMismatch, match="width"):
        _assemble(tmp_path, shards)
    assert not (tmp_path / "out.h5").exists()


def test_shard_matches_checks_layers_width_and_dtype_when_given(tmp_path):
    rows = np.array([4, 2, 9])
    path = tmp_path / "s.h5"
    write_shard(
        path,
        rows=rows,
        ids=["a", "b", "c"],
        embedding=np.zeros((3, 2, 5)),
        fingerprint="run-1",
        layers=[3, 6],
        dtype="float16",
    )
    with h5py.File(path, "r") as f:
        assert f.attrs["layers"].tolist() == [3, 6] and f.attrs["width"] == 5
    assert shard_matches(path, "run-1", rows, layers=[3, 6], width=5, dtype="float16")
    assert not shard_matches(path, "run-1", rows, layers=[3, 7])
    assert not shard_matches(path, "run-1", rows, layers=[6])
    assert not shard_matches(path, "run-1", rows, width=4)
    assert not shard_matches(path, "run-1", rows, dtype="float32")


# --- A full disk ----------------------------------------------------------------------------

#: Features per row of the disk-full tests: 50 rows of float32 make 1 MB of values.
WIDE = 5000


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(kib)`` mounts a tmpfs of that size; skipped where mounting is not allowed."""
    mounted = []

    def mount(kib: int):
        if os.geteuid() != 0:
            pytest.skip("a full disk is simulated with a small tmpfs, which only root can mount")
        folder = tmp_path / f"disk-{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    gc.collect()  # release file handles held by caught tracebacks before unmounting
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _wide_shards(tmp_path):
    embedding = np.random.default_rng(4).normal(size=(50, 1, WIDE)).astype(np.float32)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    return _shards(shard_dir, embedding, 4), embedding


def _assert_disk_full(caught, path, shards, disk):
    message = str(caught.value)
    assert isinstance(caught.value, VirnucError)
    assert str(path) in message and "space" in message
    assert "resume=True" in message and "kept" in message
    assert all(os.path.exists(s.path) for s in shards)
    assert _files(disk) == []  # the partial files are gone
    # The process is healthy: HDF5 still writes files.
    with h5py.File(disk.parent / "after.h5", "w") as f:
        f["x"] = np.arange(3)


def test_disk_full_for_the_values_raises_disk_full_before_any_shard(tmp_path, small_disk):
    # The values' blocks are reserved when the writer is created: a disk without room for them
    # stops the run before any chunk is computed, not at the end.
    disk = small_disk(256)
    shards, _ = _wide_shards(tmp_path)
    with pytest.raises(DiskFull) as caught:
        _writer(tmp_path, width=WIDE, output=disk / "out.h5")
    _assert_disk_full(caught, disk / "out.h5", shards, disk)
    with pytest.raises(DiskFull) as caught:
        _assemble(tmp_path, shards, output=disk / "out.h5")
    _assert_disk_full(caught, disk / "out.h5", shards, disk)
    del caught
    gc.collect()
    assert os.statvfs(disk).f_bfree == os.statvfs(disk).f_blocks


# h5py reports the failed write once more from the finaliser of one of its temporary objects.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_while_writing_the_layout_raises_disk_full(tmp_path, small_disk):
    # The ids (50 of 4 kB) do not fit, the values (800 bytes) would: HDF5 fails on the layout.
    disk = small_disk(64)
    ids = [f"{i:04d}" + "L" * 4000 for i in range(50)]
    embedding = np.ones((50, 1, 4), np.float32)
    shards = _shards(tmp_path, embedding, 2, ids=ids)
    with pytest.raises(DiskFull) as caught:
        _assemble(tmp_path, shards, ids=ids, output=disk / "out.h5")
    _assert_disk_full(caught, disk / "out.h5", shards, disk)
    del caught
    gc.collect()  # the failed file, collected, neither crashes the process nor holds space
    assert os.statvfs(disk).f_bfree == os.statvfs(disk).f_blocks


def test_disk_full_while_writing_the_zarr_store_leaves_neither_output(tmp_path, small_disk):
    disk = small_disk(256)
    shards, _ = _wide_shards(tmp_path)
    with pytest.raises(DiskFull) as caught:
        _assemble(tmp_path, shards, zarr_path=disk / "out.zarr")
    _assert_disk_full(caught, disk / "out.zarr", shards, disk)
    assert not (tmp_path / "out.h5").exists()


# --- Existing outputs -----------------------------------------------------------------------


def test_check_target_refuses_an_existing_output_unless_overwrite(tmp_path):
    path = tmp_path / "out.h5"
    check_target(path, "output", overwrite=False)
    path.write_bytes(b"old")
    with pytest.raises(VirnucError, match="overwrite=True"):
        check_target(path, "output", overwrite=False)
    check_target(path, "output", overwrite=True)
    folder = tmp_path / "folder.h5"
    folder.mkdir()
    with pytest.raises(VirnucError, match="directory"):
        check_target(folder, "output", overwrite=True)
    link = tmp_path / "link.h5"
    link.symlink_to(path)
    with pytest.raises(VirnucError, match="symbolic link"):
        check_target(link, "output", overwrite=True)
    assert path.read_bytes() == b"old"


def test_check_target_refuses_a_zarr_path_the_tool_did_not_make(tmp_path):
    users = tmp_path / "mine.zarr"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(VirnucError, match="not a zarr store this tool made"):
            check_target(users, "zarr store", overwrite=overwrite)
    ours = ownership.claim(tmp_path / "ours.zarr", "zarr store")
    with pytest.raises(VirnucError, match="overwrite=True"):
        check_target(ours, "zarr store", overwrite=False)
    check_target(ours, "zarr store", overwrite=True)
    (tmp_path / "file.zarr").write_text("a file")
    with pytest.raises(VirnucError):
        check_target(tmp_path / "file.zarr", "zarr store", overwrite=True)
    (tmp_path / "link.zarr").symlink_to(ours)
    with pytest.raises(VirnucError, match="symbolic link"):
        check_target(tmp_path / "link.zarr", "zarr store", overwrite=True)


def test_assemble_refuses_an_existing_output_without_overwrite(tmp_path):
    (tmp_path / "out.h5").write_bytes(b"the user's file")
    shards = _shards(tmp_path, np.ones((50, 1, 4), np.float32), 2)
    with pytest.raises(VirnucError, match="overwrite=True"):
        _assemble(tmp_path, shards)
    assert (tmp_path / "out.h5").read_bytes() == b"the user's file"


def test_assemble_never_touches_a_zarr_path_it_did_not_make(tmp_path):
    users = tmp_path / "mine.zarr"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    shards = _shards(tmp_path, np.ones((50, 1, 4), np.float32), 2)
    with pytest.raises(VirnucError, match="not a zarr store this tool made"):
        _assemble(tmp_path, shards, zarr_path=users, overwrite=True)
    assert _files(users) == ["notes.txt"] and (users / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "out.h5").exists()


def test_overwrite_replaces_both_outputs_only_once_the_new_ones_are_complete(tmp_path):
    first = np.zeros((50, 1, 4), np.float32)
    second = np.random.default_rng(5).normal(size=(50, 1, 4)).astype(np.float32)
    store = tmp_path / "out.zarr"
    _assemble(tmp_path, _shards(tmp_path, first, 2), zarr_path=store, attrs={"fingerprint": "a"})
    # A failed attempt with overwrite leaves the old outputs as they were.
    shards = _shards(tmp_path, second, 2)
    with pytest.raises(RuntimeError, match="missing"):
        _assemble(tmp_path, shards[:1], zarr_path=store, overwrite=True)
    np.testing.assert_array_equal(open_embeddings(tmp_path / "out.h5").embedding, first[:, 0])
    np.testing.assert_array_equal(open_embeddings(store).embedding, first[:, 0])
    _assemble(tmp_path, shards, zarr_path=store, overwrite=True, attrs={"fingerprint": "b"})
    np.testing.assert_array_equal(open_embeddings(tmp_path / "out.h5").embedding, second[:, 0])
    np.testing.assert_array_equal(open_embeddings(store).embedding, second[:, 0])
    assert ownership.marker(store)["fingerprint"] == "b"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_output_created_meanwhile_is_refused_at_the_rename(tmp_path):
    shards = _shards(tmp_path, np.ones((50, 1, 4), np.float32), 2)
    writer = _writer(tmp_path)
    for shard in shards:
        writer.add(shard)
    (tmp_path / "out.h5").write_bytes(b"written meanwhile")
    with pytest.raises(VirnucError, match="overwrite=True"):
        writer.close()
    assert (tmp_path / "out.h5").read_bytes() == b"written meanwhile"
    assert not list(tmp_path.glob(".out.h5*"))


def test_zarr_store_carries_the_marker_and_still_opens(tmp_path):
    store = tmp_path / "out.zarr"
    embedding = np.random.default_rng(6).normal(size=(50, 1, 4)).astype(np.float32)
    _assemble(
        tmp_path, _shards(tmp_path, embedding, 2), zarr_path=store, attrs={"fingerprint": "fp"}
    )
    found = json.loads((store / ownership.MARKER).read_text())
    assert found["kind"] == "zarr store" and found["fingerprint"] == "fp"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor a word about the marker file in the store
        group = zarr.open_group(store, mode="r")
        assert sorted(group.array_keys()) == ["embedding", "length", "sequence", "truncated"]
        ds = xr.open_zarr(store).load()
        ours = open_embeddings(store).load()
    np.testing.assert_array_equal(ds.embedding.values, embedding[:, 0])
    xr.testing.assert_identical(ours, open_embeddings(tmp_path / "out.h5").load())


def test_remove_stale_partials_removes_only_this_outputs_leftovers(tmp_path):
    output = tmp_path / "out.h5"
    hex_ = uuid.uuid4().hex
    stale_file = tmp_path / f".out.h5.{hex_}.partial"
    stale_file.write_bytes(b"half")
    stale_store = ownership.claim(tmp_path / f".out.h5.{uuid.uuid4().hex}.partial", "zarr store")
    (stale_store / "zarr.json").write_text("{}")
    unmarked = tmp_path / f".out.h5.{uuid.uuid4().hex}.partial"
    unmarked.mkdir()
    kept = [
        unmarked,
        tmp_path / ".out.h5.not-hex.partial",
        tmp_path / f".other.h5.{hex_}.partial",
        tmp_path / f"out.h5.{hex_}.partial",
        tmp_path / f".out.h5.{hex_}.partial.bak",
    ]
    for path in kept[1:]:
        path.write_bytes(b"not ours")
    assert sorted(remove_stale_partials(output)) == sorted([stale_file, stale_store])
    assert not stale_file.exists() and not stale_store.exists()
    assert all(p.exists() for p in kept)
    assert remove_stale_partials(output) == []


# --- Ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hdf5", "zarr"])
def test_a_long_id_is_read_back_without_fixed_width_strings(tmp_path, kind):
    # One 100 kB id among 300 would make a fixed-width array of 300 * 100 k * 4 bytes (120 MB).
    ids = [f"P{i:05d}" for i in range(300)] + ["L" * 100_000]
    embedding = np.random.default_rng(7).normal(size=(301, 1, 4)).astype(np.float32)
    shards = _shards(tmp_path, embedding, 3, ids=ids)
    store = tmp_path / "out.zarr"
    _assemble(tmp_path, shards, ids=ids, lengths=np.arange(301), zarr_path=store)
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert h5py.check_string_dtype(f["sequence"].dtype).length is None  # variable length
    ds = open_embeddings(tmp_path / "out.h5" if kind == "hdf5" else store)
    assert ds.sequence.dtype == object
    assert ds.sequence.values.nbytes < 10_000
    assert ds.indexes["sequence"].dtype == object
    assert list(ds.sequence.values) == ids
    np.testing.assert_array_equal(ds.sel(sequence=ids[-1]).embedding.values, embedding[-1, 0])
    np.testing.assert_array_equal(
        ds.sel(sequence=["P00003", ids[-1]]).embedding.values, embedding[[3, -1], 0]
    )


def test_open_embeddings_in_dask_blocks_selects_groups_and_keeps_the_attributes(tmp_path):
    import dask.array

    embedding = np.random.default_rng(3).normal(size=(50, 1, 16)).astype(np.float32)
    _assemble(tmp_path, _shards(tmp_path, embedding, 4), zarr_path=tmp_path / "o.zarr")
    # HDF5 in blocks of 8 rows; Zarr always in dask blocks, its stored ones by default.
    for path, chunks in ((tmp_path / "out.h5", {"sequence": 8}), (tmp_path / "o.zarr", None)):
        ds = open_embeddings(path, chunks=chunks)
        assert isinstance(ds.embedding.data, dask.array.Array)
        if chunks:
            assert ds.embedding.data.chunks[0][:2] == (8, 8)
        assert ds.attrs["model"] == "m"
        np.testing.assert_array_equal(ds.sel(sequence="P00007").embedding.values, embedding[7, 0])
        np.testing.assert_array_equal(
            ds.isel(sequence=[3, 9]).embedding.values, embedding[[3, 9], 0]
        )
        # A reduction per group, computed block by block.
        means = ds.embedding.groupby(ds.truncated).mean("sequence").compute()
        truncated = LENGTHS > 1022
        np.testing.assert_allclose(
            means.sel(truncated=True).values, embedding[truncated, 0].mean(0), rtol=1e-5
        )
        np.testing.assert_allclose(
            means.sel(truncated=False).values, embedding[~truncated, 0].mean(0), rtol=1e-5
        )


# Per-residue values: one aligned region per chunk, compressed chunks copied as they are. -----


def _residue_shards(tmp_path, counts, bounds, order, values, dtype="float16"):
    """Shards of ``bounds`` (ranges of ``order``) whose residues are rows of ``values``."""
    from virnuc_dask.output.residues import ShardResidues

    shards = []
    for number, (a, b) in enumerate(bounds):
        rows = order[a:b]
        path = tmp_path / f"res-{number}.h5"
        partial = tmp_path / f".res-{number}.partial"
        layers, width = values[0].shape[1:]
        sink = ShardResidues(partial, counts[rows], layers=layers, width=width, dtype=dtype)
        # Handed over out of order and in two calls, as batches come back.
        half = len(rows) // 2
        for part in (np.arange(half, len(rows)), np.arange(half)):
            if len(part) == 0:
                continue
            sink.write(part, np.concatenate([values[r] for r in rows[part]]), counts[rows[part]])
        sink.close()
        write_shard(
            path,
            rows=rows,
            ids=[IDS[r] for r in rows],
            embedding=np.stack([values[r].astype(np.float32).mean(0) for r in rows]),
            fingerprint="fp",
            partial=partial,
        )
        shards.append(ShardInfo(number, str(path), len(rows), 0, "w", 0.0))
    return shards


@pytest.fixture
def residue_case():
    from virnuc_dask.output import ResidueLayout

    rng = np.random.default_rng(3)
    counts = rng.integers(1, 900, len(IDS))
    order = rng.permutation(len(IDS))
    bounds = [(0, 7), (7, 30), (30, 31), (31, 50)]
    values = [rng.standard_normal((n, 1, 4)).astype(np.float16) for n in counts]
    layout = ResidueLayout.from_partition(counts, order, bounds, "float16")
    return counts, order, bounds, values, layout


def test_residue_layout_regions_are_aligned_and_disjoint(residue_case):
    counts, order, bounds, _, layout = residue_case
    spans = []
    for a, b in bounds:
        rows = order[a:b]
        region = layout.region(rows)
        assert region % 1024 == 0
        spans.append((region, region + counts[rows].sum()))
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start  # no storage chunk is shared by two chunks' regions
    assert layout.rows % 1024 == 0 and layout.rows >= spans[-1][1]
    with pytest.raises(RuntimeError, match="one region"):
        layout.region(order[0:7][::-1])


def test_residues_stream_into_hdf5_and_zarr_and_read_back_by_id(tmp_path, residue_case):
    from virnuc_dask.output import residues_of

    counts, order, bounds, values, layout = residue_case
    shards = _residue_shards(tmp_path, counts, bounds, order, values)
    with _writer(
        tmp_path, residues=layout, lengths=counts, zarr_path=tmp_path / "out.zarr"
    ) as writer:
        for shard in reversed(shards):
            writer.add(shard)
        writer.close()
    with h5py.File(tmp_path / "out.h5", "r") as f:
        data = f["residue_embedding"]
        assert data.dtype == np.float16 and data.chunks == (1024, 4)
        # Blosc (32001) with Zstandard level 1 after a byte shuffle inside.
        assert data._filters["32001"][4:] == (1, 1, 5)
    for path in (tmp_path / "out.h5", tmp_path / "out.zarr"):
        ds = open_embeddings(path)
        assert ds.residue_embedding.dims == ("residue", "feature")
        np.testing.assert_array_equal(ds.residue_start.values, layout.start)
        for i in (0, 17, 49):
            got = residues_of(ds, IDS[i])
            assert got.dims == ("position", "feature") and got.sizes["position"] == counts[i]
            np.testing.assert_array_equal(got.values, values[i][:, 0])
    # A shuffled id mapping would read another sequence's rows.
    ds = open_embeddings(tmp_path / "out.h5")
    assert not np.array_equal(residues_of(ds, IDS[1]).values[:1], values[0][:1, 0])


def _zarr_chunk(store, first_row, ndim):
    """The stored bytes of the Zarr chunk of ``residue_embedding`` that starts at ``first_row``."""
    key = "/".join(["c", str(first_row // 1024), *["0"] * (ndim - 1)])
    return (store / "residue_embedding" / key).read_bytes()


@pytest.mark.parametrize("layers", [(2,), (0, 1, 2)])
def test_zarr_residue_chunks_are_the_shards_bytes_stored_as_each_shard_arrives(
    tmp_path, residue_case, layers
):
    counts, order, bounds, _, layout = residue_case
    rng = np.random.default_rng(4)
    values = [rng.standard_normal((n, len(layers), 4)).astype(np.float16) for n in counts]
    shards = _residue_shards(tmp_path, counts, bounds, order, values)
    ndim = 2 if len(layers) == 1 else 3
    store = tmp_path / "out.zarr"
    with _writer(
        tmp_path, layers=layers, residues=layout, lengths=counts, zarr_path=store
    ) as writer:
        for shard in reversed(shards):
            writer.add(shard)
        # Before the end: the partial store already holds every chunk of every region, as
        # the shards compressed it (no decoding, no second compression).
        (partial,) = tmp_path.glob(".out.zarr.*.partial")
        for shard, (a, b) in zip(shards, bounds, strict=True):
            region = layout.region(order[a:b])
            with h5py.File(shard.path, "r") as f:
                stored = f["residues"]
                for first in range(0, stored.shape[0], 1024):
                    _, data = stored.id.read_direct_chunk((first, 0, 0))
                    assert _zarr_chunk(partial, region + first, ndim) == data
        writer.close()
    # The finished store: the file's chunks, byte for byte, and the same dataset.
    with h5py.File(tmp_path / "out.h5", "r") as f:
        data = f["residue_embedding"]
        for first in range(0, data.shape[0], 1024):
            _, chunk = data.id.read_direct_chunk((first, *[0] * (ndim - 1)))
            assert _zarr_chunk(store, first, ndim) == chunk
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the store's codecs are Zarr v3's own
        plain = xr.open_zarr(store)
        assert plain.residue_embedding.dims == (
            "residue",
            *(("layer",) if ndim == 3 else ()),
            "feature",
        )
    hdf5 = open_embeddings(tmp_path / "out.h5").load()
    xr.testing.assert_identical(open_embeddings(store).load(), hdf5)
    # One row changed in one chunk of the store (rewritten by zarr-python) is seen.
    array = zarr.open_array(store, path="residue_embedding", mode="r+")
    row = int(layout.start[17]) + 3
    array[row] = array[row] + np.float16(0.5)
    with pytest.raises(AssertionError):
        xr.testing.assert_identical(open_embeddings(store).load(), hdf5)


def test_a_writer_aborted_after_residue_shards_leaves_no_store(tmp_path, residue_case):
    counts, order, bounds, values, layout = residue_case
    shards = _residue_shards(tmp_path, counts, bounds, order, values)
    store = tmp_path / "out.zarr"
    with _writer(tmp_path, residues=layout, lengths=counts, zarr_path=store) as writer:
        for shard in shards[:2]:
            writer.add(shard)
    assert not store.exists() and not list(tmp_path.glob(".out.*"))
    assert all(Path(s.path).exists() for s in shards)  # kept for a resumed run


def test_a_shard_without_residues_or_of_another_dtype_is_refused(tmp_path, residue_case):
    counts, order, bounds, values, layout = residue_case
    plain = _shards(tmp_path, np.zeros((50, 1, 4), np.float32), 2)
    with (
        _writer(tmp_path, residues=layout, lengths=counts) as writer,
        pytest.raises(ShardMismatch, match="no per-residue"),
    ):
        writer.add(plain[0])
    wide = _residue_shards(tmp_path, counts, bounds, order, values, dtype="float32")
    with (
        _writer(tmp_path, residues=layout, lengths=counts) as writer,
        pytest.raises(ShardMismatch, match="residue dtype"),
    ):
        writer.add(wide[0])


def test_values_are_mapped_where_the_system_has_no_posix_fallocate(tmp_path, monkeypatch):
    import os

    from virnuc_dask.output.layout import map_reserved

    monkeypatch.delattr(os, "posix_fallocate")  # as on macOS
    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * 64)
    mapped = map_reserved(path, 16, (3, 4), np.dtype("float32"))
    mapped[:] = 1.5
    mapped.flush()
    assert np.frombuffer(path.read_bytes()[16:64], dtype=np.float32).tolist() == [1.5] * 12
