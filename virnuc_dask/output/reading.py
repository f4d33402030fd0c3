"""Reading an output back: :func:`open_embeddings` gives an ``xarray.Dataset``.

A local output and one at a URL are opened alike, through their
:class:`~virnuc_dask.storage.places.Place`: a Zarr store by its path or URL (zarr makes its own
fsspec store for a URL, with the storage options); an HDF5 file through
:meth:`~virnuc_dask.storage.places.Place.source`, which is the path itself for a local file
(HDF5's own driver) and an fsspec file read by byte ranges for a URL (the dataset keeps it
open while it is used).

Decisions:

- One reading for every way in: :func:`open_embeddings` and xarray's engine ``virnuc``
  (:mod:`.backend`, ``xarray.open_dataset(path, engine="virnuc")``) are this function, so the
  two cannot drift apart; the engine only adapts xarray's arguments to it.
- Ids (and reads' ids) are read by h5py or zarr as variable-length strings, as object arrays of
  ``str``, not decoded by xarray, which would make them a fixed-width array as wide as the
  longest id.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter of residue_embedding)
import numpy as np

from virnuc_dask.errors import VirnucError
from virnuc_dask.output.zarr_store import MARKER_WARNING


def open_embeddings(
    path: str | Path,
    chunks: dict | str | None = None,
    storage_options: dict | None = None,
    drop_variables: str | Iterable[str] | None = None,
):
    """Open an embedding file (HDF5 or Zarr) as an ``xarray.Dataset``.

    Parameters
    ----------
    path
        An HDF5 file written by :func:`virnuc_dask.embed`, or its ``--zarr`` store; either
        may be an fsspec URL (``s3://bucket/out.h5``), read in place.
    chunks
        Dask chunks for the variables (``{"sequence": 100_000}``, ``"auto"``): the values
        become dask arrays, read block by block when computed, for files larger than memory.
        Default: xarray's lazy arrays, read whole on first use (a Zarr store is always
        opened with dask, in its own blocks).
    storage_options
        fsspec options for a URL (endpoint, profile, ...), as ``embed`` takes them; the
        standard places (``AWS_ENDPOINT_URL``, profiles) need none.
    drop_variables
        Variables not to read (a name or several), as ``xarray.open_dataset`` takes them.

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

    from virnuc_dask.storage.remote import place
    from virnuc_dask.storage.urls import StorageOptions

    dropped = {drop_variables} if isinstance(drop_variables, str) else set(drop_variables or ())
    # The strings are never xarray's to decode; the rest it skips as asked.
    skipped = sorted(dropped | set(_STRINGS))
    where = place(path, StorageOptions.of(storage_options))
    if not where.exists():
        raise VirnucError(f"no embedding file at {path}")
    store = where.is_dir()
    source = str(where) if store else where.source()
    options = where.storage.kwargs()
    if store:
        with warnings.catch_warnings():
            # Stores of earlier versions, without consolidated metadata, are listed.
            warnings.filterwarnings("ignore", message=MARKER_WARNING)
            given = {} if chunks is None else {"chunks": chunks}
            if options:
                given["storage_options"] = options
            dataset = xr.open_zarr(source, drop_variables=skipped, **given)
            strings = _zarr_strings(source, options, dropped)
    else:
        dataset = xr.open_dataset(source, engine="h5netcdf", drop_variables=skipped, chunks=chunks)
        strings = _hdf5_strings(source, dropped)
    if chunks is not None or store:
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


def _hdf5_strings(source, dropped: set[str]) -> dict[str, np.ndarray]:
    with h5py.File(source, "r") as f:
        return {name: f[name].asstr()[:] for name in _STRINGS if name in f and name not in dropped}


def _zarr_strings(source, options: dict, dropped: set[str]) -> dict[str, np.ndarray]:
    import zarr

    given = {"storage_options": options} if options else {}
    group = zarr.open_group(str(source), mode="r", **given)
    # zarr returns numpy's variable-width StringDType; xarray and pandas index objects.
    return {
        name: group[name][:].astype(object)
        for name in _STRINGS
        if name in group and name not in dropped
    }
