"""xarray's engine ``virnuc``: ``xarray.open_dataset(path, engine="virnuc")`` opens an output.

Registered as the entry point ``virnuc`` of the group ``xarray.backends`` (``pyproject.toml``),
so an installed ``virnuc-dask`` adds the engine to every xarray of its environment.

Decisions:

- One reading: :meth:`VirnucBackend.open_dataset` is
  :func:`~virnuc_dask.output.reading.open_embeddings` (HDF5 file or Zarr store, local or at a
  URL, ``storage_options`` given as a keyword or in ``backend_kwargs``), so both give the same
  dataset: ids as object arrays of ``str``, per-residue and read variables included. ``chunks``
  and ``cache`` are xarray's own, applied by ``open_dataset`` to what the reading returns.
  xarray's decoding options (``decode_times``, ...) are not taken: the layout has nothing
  they would change, and a reading with other decoding would not be ``open_embeddings``'.
- Cheap to import: xarray imports every installed engine's module each time it lists the
  engines (any ``open_dataset`` without ``engine=``), so this module imports only the
  standard library and xarray's base class; h5py and the reading come when a file is read.
- :meth:`~VirnucBackend.guess_can_open` claims only this tool's outputs, so that
  ``open_dataset`` without ``engine=`` picks it for them and never for other files: an HDF5
  file whose root attribute ``versions`` (JSON, written in every output) names
  ``virnuc_dask``; a Zarr store holding the tool's ownership marker and that attribute in its
  root ``zarr.json``. The marker is looked at first, one ``stat``, so that guessing another
  store costs no read of its metadata. A URL is never claimed (guessing must not reach the
  network; give ``engine="virnuc"``). xarray asks its netCDF engines (``h5netcdf``) before any
  other, and they open every HDF5 file: an HDF5 output opened without ``engine=`` is still
  h5netcdf's, as before (ids fixed-width); a Zarr store of the tool is ``virnuc``'s, asked
  before ``zarr``.
- A file object is refused with a message (the reading needs the path, to tell a file from a
  store and to read the ids with h5py or zarr).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from xarray.backends import BackendEntrypoint

#: The first bytes of every HDF5 file (without a user block, which outputs never have).
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: The tool's ownership marker inside a Zarr store (:mod:`virnuc_dask.storage.ownership`).
_MARKER = ".virnuc-dask"


class VirnucBackend(BackendEntrypoint):
    """xarray's engine for the outputs of virnuc_dask (HDF5 file or Zarr store).

    ``xarray.open_dataset(path, engine="virnuc")`` returns what
    :func:`virnuc_dask.open_embeddings` returns; ``chunks=`` makes the variables dask arrays
    as xarray does for any engine, and ``storage_options=`` (or ``backend_kwargs=``) passes
    fsspec options for a URL.

    Examples
    --------
    >>> ds = xr.open_dataset("out.h5", engine="virnuc")  # doctest: +SKIP
    >>> ds = xr.open_dataset("s3://bucket/out.zarr", engine="virnuc",
    ...                      storage_options={"profile": "lab"})  # doctest: +SKIP
    """

    description = "ESM-2 embeddings written by virnuc_dask (HDF5 file or Zarr store)"
    # The project publishes no documentation site; docs/output.md is the reference.
    url = ""
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "storage_options")

    def open_dataset(
        self,
        filename_or_obj,
        *,
        drop_variables: str | Iterable[str] | None = None,
        storage_options: dict | None = None,
    ):
        """Open an output as :func:`~virnuc_dask.output.reading.open_embeddings` does.

        Parameters
        ----------
        filename_or_obj
            The output's path or URL.
        drop_variables
            Variables not to read.
        storage_options
            fsspec options for a URL.

        Returns
        -------
        xarray.Dataset
            The output, lazily loaded (see ``open_embeddings``).

        Raises
        ------
        VirnucError
            ``filename_or_obj`` is not a path or a URL, or nothing is there.
        """
        from virnuc_dask.errors import VirnucError
        from virnuc_dask.output.reading import open_embeddings

        if not isinstance(filename_or_obj, str | os.PathLike):
            raise VirnucError(
                f"engine 'virnuc' opens a path or a URL, not {type(filename_or_obj).__name__}: "
                "give the output's path"
            )
        return open_embeddings(
            filename_or_obj, storage_options=storage_options, drop_variables=drop_variables
        )

    def guess_can_open(self, filename_or_obj) -> bool:
        """Whether ``filename_or_obj`` is a local output of virnuc_dask (see the module).

        Parameters
        ----------
        filename_or_obj
            What ``xarray.open_dataset`` was given.

        Returns
        -------
        bool
            True for an HDF5 file or a Zarr store this tool wrote; False for anything else,
            URLs and file objects included.
        """
        if not isinstance(filename_or_obj, str | os.PathLike):
            return False
        from virnuc_dask.storage.urls import is_url

        if is_url(os.fspath(filename_or_obj)):
            return False
        path = Path(os.fspath(filename_or_obj))
        try:
            if path.is_dir():
                return (path / _MARKER).is_file() and _names_this_tool(_zarr_attributes(path))
            if not path.is_file():
                return False
            with open(path, "rb") as f:
                if f.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE:
                    return False
            return _names_this_tool(_hdf5_attributes(path))
        except PermissionError:
            raise  # xarray passes it on: the user should hear why the file cannot be read
        except (OSError, ValueError):
            # Not readable as what it looks like (truncated, being written, not JSON): not ours.
            return False


def _zarr_attributes(store: Path) -> dict:
    metadata = json.loads((store / "zarr.json").read_text())
    return metadata.get("attributes", {}) if isinstance(metadata, dict) else {}


def _hdf5_attributes(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        versions = f.attrs.get("versions")
    return {} if versions is None else {"versions": versions}


def _names_this_tool(attributes: dict) -> bool:
    """Whether the attribute ``versions`` is JSON naming ``virnuc_dask``, as outputs write it."""
    versions = attributes.get("versions")
    if isinstance(versions, bytes):
        versions = versions.decode("utf-8", "replace")
    if not isinstance(versions, str):
        return False
    try:
        parsed = json.loads(versions)
    except ValueError:
        return False
    return isinstance(parsed, dict) and "virnuc_dask" in parsed
