"""The Zarr store: the finished file's content, chunked by rows and compressed.

Written at the end from the finished HDF5 file: its chunks are compressed blocks of rows, and
the rows of a block arrive from many chunks (the partition deals rows by length), so a block is
complete only at the end. ``residue_embedding`` is copied one storage chunk
(:data:`~virnuc_dask.output.residues.RESIDUES_PER_CHUNK` rows) at a time, chunked the same in
the store, so no process holds it whole.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import hdf5plugin  # noqa: F401  (registers the Zstandard filter of residue_embedding)
import numpy as np

from virnuc_dask import ownership
from virnuc_dask.output.residues import RESIDUES_PER_CHUNK

#: Rows per HDF5/Zarr chunk of the final file.
ROWS_PER_CHUNK = 4096
#: What zarr-python says on listing a store folder that holds the ownership marker.
MARKER_WARNING = f"Object at {re.escape(ownership.MARKER)} is not recognized"


def hdf5_to_zarr(
    hdf5: Path,
    store: Path,
    ids: list[str],
    attrs: dict,
    variables: dict[str, np.ndarray] | None = None,
) -> None:
    """Write the finished HDF5 file's content as a Zarr store, chunked by rows."""
    import h5py
    import xarray as xr

    rows = max(1, min(ROWS_PER_CHUNK, len(ids)))
    variables = variables or {}
    chunks = {"sequence": rows}
    with h5py.File(hdf5, "r") as f:
        if "residue_embedding" in f:
            # Read and written one storage chunk at a time: never the whole variable.
            chunks["residue"] = max(1, min(RESIDUES_PER_CHUNK, f["residue_embedding"].shape[0]))
    with xr.open_dataset(
        hdf5,
        engine="h5netcdf",
        drop_variables=["sequence", *variables],
        chunks=chunks,
    ) as source:
        # Object ids: xarray's decoding would make them as wide as the longest id on every row.
        dataset = source.assign_coords(sequence=np.array(ids, dtype=object))
        # Encoded as a fresh dataset would be, not as the HDF5 file (contiguous, its source).
        for variable in dataset.variables.values():
            variable.encoding = {}
        dataset.attrs = dict(attrs)
        # The reads' provenance from memory (small), text as str: as the HDF5 file decodes.
        coords = {
            name: ("sequence", _as_text(values) if values.dtype.kind == "S" else values)
            for name, values in ((k, np.asarray(v)) for k, v in variables.items())
        }
        _to_zarr(dataset, store, coords)


def _as_text(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() for v in values.tolist()], dtype=object)


def _to_zarr(dataset, path: Path, coords: dict | None = None) -> None:
    import dask

    rows = min(ROWS_PER_CHUNK, dataset.sizes["sequence"])
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        # Variable-length strings and consolidated metadata are not yet in the Zarr v3 core
        # specification, and the store's ownership marker is no Zarr node: zarr-python warns
        # about each while writing. xarray and zarr-python read them back fine.
        warnings.filterwarnings("ignore", message=".*not part of the Zarr format 3")
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        warnings.filterwarnings("ignore", message=MARKER_WARNING)
        # Mode "a": the folder exists already, holding only the ownership marker, which "w"
        # would delete and "w-" refuses. Consolidated: readers then take the list of arrays
        # from zarr.json instead of listing the folder, so they neither warn about the marker
        # nor (xarray's default) about a store without consolidated metadata. Coordinates
        # given in memory are added after chunking: a dask array of strings would be computed
        # once to find its type, with a warning.
        chunked = dataset.chunk({"sequence": rows}).assign_coords(coords or {})
        chunked.to_zarr(path, zarr_format=3, mode="a", consolidated=True)
