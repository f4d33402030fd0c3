"""The Zarr store: the finished file's content, chunked by rows and compressed.

Decisions:

- **Per-residue chunks as they arrive, the same bytes as the file's.** ``residue_embedding``
  is created in the partial store when the run starts, with the HDF5 variable's dims,
  attributes, chunks and encoding (:func:`~virnuc_dask.output.residues.zarr_codec`: the
  Blosc buffers the workers wrote); the writer stores each shard's compressed chunks under
  their keys as the shard arrives (:class:`ResidueChunks`), never decoding them. So nothing
  of the residues is left after the last chunk (copying them from the finished file, decode
  and compress again on one core, took 6.0 s per 0.5 GB of rows). Each chunk of the store
  belongs to one task chunk's region (:mod:`.residues`), so it is whole when written.
- **The rest at the end, from the finished HDF5 file.** The pooled ``embedding`` and the
  variables along ``sequence`` are chunked by :data:`ROWS_PER_CHUNK` sequences in input
  order, and the rows of such a block arrive from many chunks (the partition deals rows by
  length), so a block is complete only at the end. They are small beside the residues.
- **Consolidated metadata last**: written with the rest, it lists ``residue_embedding`` too;
  readers open the store from it (see :func:`_to_zarr`).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import hdf5plugin  # noqa: F401  (registers the Blosc filter of residue_embedding)
import numpy as np

from virnuc_dask.output.residues import zarr_codec
from virnuc_dask.storage import ownership

#: Rows per HDF5/Zarr chunk of the final file.
ROWS_PER_CHUNK = 4096
#: What zarr-python says on listing a store folder that holds the ownership marker.
MARKER_WARNING = f"Object at {re.escape(ownership.MARKER)} is not recognized"


class ResidueChunks:
    """``residue_embedding`` in a partial store, filled with compressed chunks as they come.

    Created from the partial HDF5 file's variable (dims, attributes, shape, chunks), before
    any chunk is written; :meth:`put` stores one chunk's bytes, as the shards hold them, under
    its key. Writing the rest of the store later (:func:`hdf5_to_zarr` with ``residues=True``)
    leaves it as it is.

    Parameters
    ----------
    hdf5
        The partial HDF5 file, holding ``residue_embedding`` (not open for writing elsewhere).
    store
        The partial store (a folder holding only the ownership marker, or more).
    """

    def __init__(self, hdf5: Path, store: Path) -> None:
        import xarray as xr
        import zarr
        from zarr.codecs import BytesCodec

        with xr.open_dataset(hdf5, engine="h5netcdf", chunks={}) as source:
            variable = source["residue_embedding"].variable
            chunks = variable.encoding["chunksizes"]
            dataset = xr.Dataset({"residue_embedding": variable.copy(deep=False)})
            dataset["residue_embedding"].encoding = {}
            encoding = {
                "chunks": chunks,
                "serializer": BytesCodec(),
                "filters": [],
                "compressors": [zarr_codec(variable.dtype, chunks)],
            }
            # Metadata only: the data (never computed) comes chunk by chunk through put().
            with _quiet():
                dataset.to_zarr(
                    store,
                    zarr_format=3,
                    mode="a",
                    compute=False,
                    consolidated=False,
                    encoding={"residue_embedding": encoding},
                )
        self._array = zarr.open_array(store, path="residue_embedding", mode="r+")
        self._rows = chunks[0]
        self._tail = (0,) * (len(chunks) - 1)

    def put(self, first_row: int, data: bytes) -> None:
        """Store the compressed chunk that starts at ``first_row`` (a multiple of the chunk)."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        number, offset = divmod(first_row, self._rows)
        if offset:
            raise ValueError(f"row {first_row} does not start a chunk of {self._rows} rows")
        key = self._array.metadata.encode_chunk_key((number, *self._tail))
        buffer = default_buffer_prototype().buffer.from_bytes(data)
        sync((self._array.store_path / key).set(buffer))


def hdf5_to_zarr(
    hdf5: Path,
    store: Path,
    ids: list[str],
    attrs: dict,
    variables: dict[str, np.ndarray] | None = None,
) -> None:
    """Write the finished HDF5 file's content as a Zarr store, chunked by rows.

    All but ``residue_embedding``, which a per-residue store holds already, whole
    (:class:`ResidueChunks`).
    """
    import xarray as xr

    rows = max(1, min(ROWS_PER_CHUNK, len(ids)))
    variables = variables or {}
    with xr.open_dataset(
        hdf5,
        engine="h5netcdf",
        drop_variables=["sequence", "residue_embedding", *variables],
        chunks={"sequence": rows},
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
    with dask.config.set(scheduler="synchronous"), _quiet():
        # Mode "a": the folder exists already, holding the ownership marker (and, with
        # per-residue values, ``residue_embedding``), which "w" would delete and "w-" refuses.
        # Consolidated: readers then take the list of arrays from zarr.json instead of
        # listing the folder, so they neither warn about the marker nor (xarray's default)
        # about a store without consolidated metadata. Coordinates given in memory are added
        # after chunking: a dask array of strings would be computed once to find its type,
        # with a warning.
        chunked = dataset.chunk({"sequence": rows}).assign_coords(coords or {})
        chunked.to_zarr(path, zarr_format=3, mode="a", consolidated=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence what zarr-python says about a store of ours while writing it."""
    with warnings.catch_warnings():
        # Variable-length strings and consolidated metadata are not yet in the Zarr v3 core
        # specification, and the store's ownership marker is no Zarr node: zarr-python warns
        # about each while writing. xarray and zarr-python read them back fine.
        warnings.filterwarnings("ignore", message=".*not part of the Zarr format 3")
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        warnings.filterwarnings("ignore", message=MARKER_WARNING)
        yield
