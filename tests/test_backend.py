"""The xarray engine ``virnuc``: ``xr.open_dataset(path, engine="virnuc")`` is ``open_embeddings``.

The outputs come from one real run on reads (two worker processes of a ``LocalCluster``, the
tiny architecture with random weights) with per-residue values and a Zarr store, so that the
ids, the reads' ids, the provenance coordinates and ``residue_embedding`` are all compared.
The engine is found through the installed package's entry point, as a user's xarray finds it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import dask
import h5py
import numpy as np
import pytest
import xarray as xr

import virnuc_dask
from tests.helpers import TINY
from tests.servers import s3_server
from virnuc_dask.errors import VirnucError


@pytest.fixture(scope="module")
def outputs(cluster_client, tmp_path_factory):
    """An HDF5 output and its Zarr store, per residue, of 30 reads in six frames."""
    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("backend")
    reads = ["".join(rng.choice(list("ACGT"), size=rng.integers(40, 120))) for _ in range(30)]
    fasta = folder / "reads.fa"
    fasta.write_text("".join(f">r{i}\n{bases}\n" for i, bases in enumerate(reads)))
    job = virnuc_dask.prepare(
        [fasta],
        folder / "out.h5",
        client=cluster_client,
        zarr=folder / "out.zarr",
        model=TINY,
        random_weights=True,
        translate="six-frame",
        per_residue=True,
        chunk_tokens=800,
    )
    path = job.run(cluster_client, progress=False)
    return folder / "out.h5", folder / "out.zarr", path


def _engine():
    return xr.backends.list_engines()["virnuc"]


def test_xarray_lists_the_engine_of_the_installed_package():
    xr.backends.refresh_engines()
    engine = xr.backends.list_engines()["virnuc"]
    assert type(engine).__module__ == "virnuc_dask.output.backend"
    assert type(engine).__name__ == "VirnucBackend"
    assert engine.open_dataset_parameters == (
        "filename_or_obj",
        "drop_variables",
        "storage_options",
    )
    assert "virnuc_dask" in engine.description


def test_the_entry_point_module_imports_neither_torch_nor_distributed_nor_h5py():
    """xarray imports every engine's module whenever it lists them: it must stay cheap."""
    heavy = ("torch", "distributed", "h5py", "hdf5plugin", "zarr", "fsspec")
    result = subprocess.run(
        [sys.executable, "-c", "import sys, virnuc_dask.output.backend; "
         f"print([m for m in {heavy!r} if m in sys.modules])"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", ["hdf5", "zarr"])
def test_open_dataset_with_the_engine_equals_open_embeddings(outputs, kind):
    path = outputs[0] if kind == "hdf5" else outputs[1]
    expected = virnuc_dask.open_embeddings(path).load()
    with xr.open_dataset(path, engine="virnuc") as ds:
        assert ds.sequence.dtype == object and ds.read.dtype == object
        assert "residue_embedding" in ds and "residue_start" in ds
        xr.testing.assert_identical(ds.load(), expected)
    size = 16 if kind == "hdf5" else 4096  # finer than the store's chunks, xarray would warn
    # Computed in this process: the module's cluster is the default client, and a worker that
    # has not imported hdf5plugin cannot decode residue_embedding (open_embeddings alike).
    with (
        dask.config.set(scheduler="threads"),
        xr.open_dataset(str(path), engine="virnuc", chunks={"sequence": size}) as ds,
    ):
        assert ds.embedding.chunks[0][0] == min(size, ds.sizes["sequence"])
        xr.testing.assert_identical(ds.load(), expected)


@pytest.mark.parametrize("kind", ["hdf5", "zarr"])
def test_per_residue_rows_read_through_the_engine(outputs, kind):
    path = outputs[0] if kind == "hdf5" else outputs[1]
    expected = virnuc_dask.open_embeddings(path)
    with xr.open_dataset(path, engine="virnuc") as ds:
        for ident in ds.sequence.values[[0, 7, -1]]:
            rows = virnuc_dask.residues_of(ds, ident)
            assert rows.dims == ("position", "feature")
            assert np.isfinite(rows.values).all()
            xr.testing.assert_identical(rows, virnuc_dask.residues_of(expected, ident))


def test_drop_variables_are_not_read(outputs):
    h5, store, _ = outputs
    for path in (h5, store):
        with xr.open_dataset(
            path, engine="virnuc", drop_variables=["residue_embedding", "read"]
        ) as ds:
            assert "residue_embedding" not in ds.variables and "read" not in ds.variables
            assert ds.sequence.dtype == object and "embedding" in ds
        with xr.open_dataset(path, engine="virnuc", drop_variables="frame") as ds:
            assert "frame" not in ds.variables and "read" in ds.coords


def test_guess_can_open_knows_this_tools_outputs_and_nothing_else(outputs, tmp_path):
    h5, store, _ = outputs
    engine = _engine()
    assert engine.guess_can_open(h5) and engine.guess_can_open(str(h5))
    assert engine.guess_can_open(store) and engine.guess_can_open(f"{store}/")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["embedding"] = np.zeros((3, 4), np.float32)
        f.attrs["model"] = TINY
    netcdf = tmp_path / "xarray.nc"
    xr.Dataset({"x": ("sequence", [1, 2])}).to_netcdf(netcdf, engine="h5netcdf")
    foreign_store = tmp_path / "xarray.zarr"
    xr.Dataset({"x": ("sequence", [1, 2])}).to_zarr(foreign_store, zarr_format=2)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    others = [plain, netcdf, foreign_store, text, tmp_path / "missing.h5", tmp_path]
    others += ["s3://bucket/out.h5", "s3://bucket/out.zarr", b"\x89HDF\r\n\x1a\n"]
    for other in others:
        assert not engine.guess_can_open(other), other
    # A copy of the file is still this tool's output; a store without its marker is not.
    shutil.copy(h5, tmp_path / "copy.h5")
    assert engine.guess_can_open(tmp_path / "copy.h5")
    shutil.copytree(store, tmp_path / "copy.zarr", ignore=shutil.ignore_patterns(".virnuc-dask"))
    assert not engine.guess_can_open(tmp_path / "copy.zarr")


def test_open_dataset_without_an_engine(outputs, tmp_path):
    """xarray asks its netCDF engines first: the HDF5 file goes to h5netcdf, as before; the
    store is claimed by ``virnuc`` (asked before ``zarr``); other stores stay ``zarr``'s."""
    h5, store, _ = outputs
    assert xr.backends.plugins.guess_engine(h5) == "h5netcdf"
    assert xr.backends.plugins.guess_engine(store) == "virnuc"
    with xr.open_dataset(store) as ds:
        xr.testing.assert_identical(ds.load(), virnuc_dask.open_embeddings(store).load())
    foreign_store = tmp_path / "xarray.zarr"
    xr.Dataset({"x": ("sequence", [1, 2])}).to_zarr(foreign_store, zarr_format=2)
    assert xr.backends.plugins.guess_engine(foreign_store) == "zarr"
    with xr.open_dataset(foreign_store) as ds:
        assert ds.x.values.tolist() == [1, 2]
    with xr.open_dataset(h5) as ds:
        np.testing.assert_array_equal(
            ds.embedding.values, virnuc_dask.open_embeddings(h5).embedding.values
        )


def test_outputs_at_a_url_with_storage_options(outputs):
    """The endpoint and credentials only in ``storage_options`` (the module's workers started
    before the server, without its environment): the engine passes them to the reading."""
    h5, store, _ = outputs
    import fsspec
    from s3fs import S3FileSystem

    with s3_server() as endpoint:
        s3 = fsspec.filesystem("s3", skip_instance_cache=True)
        s3.mkdir("outputs")
        s3.put(str(h5), "outputs/out.h5")
        s3.put(str(store), "outputs/out.zarr", recursive=True)
        # Removed for the rest of the server's life (which restores the environment at exit).
        os.environ.pop("AWS_ENDPOINT_URL")
        S3FileSystem.clear_instance_cache()
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        for local, url in ((h5, "s3://outputs/out.h5"), (store, "s3://outputs/out.zarr")):
            expected = virnuc_dask.open_embeddings(local).load()
            with xr.open_dataset(url, engine="virnuc", storage_options=options) as ds:
                xr.testing.assert_identical(ds.load(), expected)
            with xr.open_dataset(
                url, engine="virnuc", backend_kwargs={"storage_options": options}
            ) as ds:
                xr.testing.assert_identical(ds.load(), expected)


def test_a_missing_path_or_a_file_object_is_a_user_error(tmp_path, outputs):
    with pytest.raises(VirnucError, match="no embedding file at .*missing.h5"):
        xr.open_dataset(tmp_path / "missing.h5", engine="virnuc")
    with (
        open(outputs[0], "rb") as handle,
        pytest.raises(VirnucError, match="engine 'virnuc' opens a path or a URL"),
    ):
        xr.open_dataset(handle, engine="virnuc")
