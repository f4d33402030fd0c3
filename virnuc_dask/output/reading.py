"""Reading an output back: :func:`open_embeddings` gives an ``xarray.Dataset``."""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Zstandard filter of residue_embedding)
import numpy as np

from virnuc_dask.errors import VirnucError
from virnuc_dask.output.zarr_store import MARKER_WARNING


def open_embeddings(path: str | Path, chunks: dict | str | None = None):
    """Open an embedding file (HDF5 or Zarr) as an ``xarray.Dataset``.

    Parameters
    ----------
    path
        An HDF5 file written by :func:`virnuc_dask.embed`, or its ``--zarr`` store.
    chunks
        Dask chunks for the variables (``{"sequence": 100_000}``, ``"auto"``): the values
        become dask arrays, read block by block when computed, for files larger than memory.
        Default: xarray's lazy arrays, read whole on first use (a Zarr store is always
        opened with dask, in its own blocks).

    Returns
    -------
    xarray.Dataset
        With ``embedding``, ``length`` and ``truncated`` indexed by ``sequence`` (the ids, an
        object array of ``str``: xarray's own decoding makes a fixed-width array as wide as
        the longest id), lazily loaded. A run on reads adds ``read`` (also an object array of
        ``str``), ``frame``, ``strand``, ``nt_start``, ``nt_end`` (and ``piece``, ...), so
        that ``ds.groupby("read")`` gathers each read's peptides. A per-residue output adds
        ``residue_start`` and ``residue_embedding`` (lazily read; one sequence's rows with
        :func:`~virnuc_dask.output.residues_of`), a windowed one ``windows``.
    """
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise VirnucError(f"no embedding file at {path}")
    if path.is_dir():
        with warnings.catch_warnings():
            # Stores of earlier versions, without consolidated metadata, are listed.
            warnings.filterwarnings("ignore", message=MARKER_WARNING)
            given = {} if chunks is None else {"chunks": chunks}
            dataset = xr.open_zarr(path, drop_variables=list(_STRINGS), **given)
        strings = _zarr_strings(path)
    else:
        dataset = xr.open_dataset(
            path, engine="h5netcdf", drop_variables=list(_STRINGS), chunks=chunks
        )
        strings = _hdf5_strings(path)
    if chunks is not None or path.is_dir():
        # One value per sequence (lengths, flags, read provenance) is small: in memory, so it
        # can label groups (xarray cannot group by a dask array without being told the labels).
        small = [n for n, v in dataset.variables.items() if v.dims == ("sequence",)]
        dataset = dataset.assign({n: dataset[n].load() for n in small if n in dataset.data_vars})
        dataset = dataset.assign_coords(
            {n: dataset[n].load() for n in small if n in dataset.coords}
        )
    if "sequence" in strings:
        dataset = dataset.assign_coords(sequence=strings.pop("sequence"))
    return dataset.assign_coords({name: ("sequence", values) for name, values in strings.items()})


#: Variables of variable-length strings, read as object arrays of ``str``.
_STRINGS = ("sequence", "read")


def _hdf5_strings(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name].asstr()[:] for name in _STRINGS if name in f}


def _zarr_strings(path: Path) -> dict[str, np.ndarray]:
    import zarr

    # zarr returns numpy's variable-width StringDType; xarray and pandas index objects.
    return {
        name: zarr.open_array(path, path=name, mode="r")[:].astype(object)
        for name in _STRINGS
        if (path / name).is_dir()
    }
