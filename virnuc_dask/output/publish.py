"""Publishing outputs at URLs: stand-ins built locally, then put on the object store.

Shards, the HDF5 file and the Zarr store at URLs are all built locally as for a local output
(:class:`~.writer.OutputWriter`, with its memory map and reserved blocks) and then uploaded,
because object stores have no rename and no partial writes into an object:

- **Shards**: a worker writes its shard to a local file and puts it in one call; one PUT is
  atomic, so a shard at its URL is always whole (no ``.partial`` names on the store). The
  driver fetches each shard's bytes as it arrives and copies its rows into the output.
- **HDF5 output**: written in the driver's local folder (the work directory when it is local,
  else a temporary folder, ``TMPDIR``), then uploaded in one put, so a partial file is never
  visible at the URL. Without ``overwrite`` the put is conditional (``If-None-Match: *``): an
  object that appeared at the URL meanwhile is never replaced.
- **Zarr store**: written locally as a local store is (residue chunks as shards arrive, the
  rest from the finished file), then uploaded object by object: its ownership marker first,
  its arrays' chunks and metadata next, and its root ``zarr.json`` (which holds the
  consolidated metadata every reader opens first) last, so that readers find a store only
  once it is complete. With ``overwrite`` the old store (checked to be one this tool made)
  is removed just before: an object store cannot swap two prefixes, so for that moment
  there is no store at the URL.
- Workers do not write Zarr regions themselves: a chunk of the pooled ``embedding`` holds
  rows of many chunks (the partition deals rows by length), so it is complete only at the
  end; the residue chunks, whole per shard, are the shards' bytes, stored by the driver.
- Both outputs at URLs: the store's objects go first, then the HDF5 file, then the store's
  root ``zarr.json``: they appear within moments of each other, or neither does.
- An output at a URL is checked by the same rules as a local one
  (:func:`~.targets.check_target`, written once for both kinds of place), and the kinds of
  target are :mod:`.targets`' own. Which outputs need a stand-in is the one question asked of
  the kind of place here (:func:`stand_ins`): a local output is written beside itself and
  renamed into place, which an object store cannot do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

from virnuc_dask.errors import VirnucError, option
from virnuc_dask.output.targets import OUTPUT, ZARR_STORE, appeared, check_target
from virnuc_dask.storage import ownership
from virnuc_dask.storage.local import Local
from virnuc_dask.storage.remote import Remote, place
from virnuc_dask.storage.urls import StorageOptions, is_url

logger = logging.getLogger(__name__)

#: The object readers open first in a Zarr v3 store: uploaded last.
ROOT = "zarr.json"


def shard_source(path: str, storage: StorageOptions | None = None) -> str | BinaryIO:
    """What h5py should open for the shard at ``path``: the path, or a URL's local copy.

    A URL's shard is downloaded into an unnamed temporary file (removed when it is closed),
    not into memory: a per-residue shard holds gigabytes
    (:meth:`~virnuc_dask.storage.places.Place.local_source`). The caller closes a file it gets.

    Raises
    ------
    FileNotFoundError
        No shard at the URL.
    """
    return place(path, storage).local_source()


def put_shard(local: Path, url: str, storage: StorageOptions | None = None) -> None:
    """Put a shard written locally at its place, whole (one PUT, or a rename)."""
    place(url, storage).put(local)


def stand_ins(
    output: Path | Remote, zarr: Path | Remote | None, folder: Path
) -> tuple[Path, Path | None, list[tuple[Path, Remote, str]]]:
    """Local paths for the writer to build outputs at URLs in, and what to :func:`publish`.

    Parameters
    ----------
    output, zarr
        The run's outputs: local paths (returned as they are) or URLs.
    folder
        A local folder of the run's (created if need be) for the stand-ins.

    Returns
    -------
    output, zarr, written
        The paths the writer writes, and ``(stand-in, URL, kind)`` for each output at a URL.
    """
    written: list[tuple[Path, Remote, str]] = []

    def local(target: Path | Remote, kind: str, sub: str) -> Path:
        if not is_url(target):
            return place(target).native  # written beside itself, renamed into place (.targets)
        stand_in = folder / sub / target.name
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        written.append((stand_in, target, kind))
        return stand_in

    local_output = local(output, OUTPUT, "output")
    local_zarr = local(zarr, ZARR_STORE, "output-zarr") if zarr is not None else None
    return local_output, local_zarr, written


def publish(written: list[tuple[Path, Remote, str]], *, overwrite: bool) -> None:
    """Upload finished local outputs to their URLs (see the module's docstring for the order).

    Parameters
    ----------
    written
        ``(local file or store, URL, kind)`` for each output at a URL.
    overwrite
        Whether an existing output may be replaced.
    """
    for _, target, kind in written:
        try:
            check_target(target, kind, overwrite=overwrite)
        except VirnucError as error:
            raise VirnucError(f"{error}. {appeared(target)}") from None
    stores = [(local, target) for local, target, kind in written if kind == ZARR_STORE]
    for local, target in stores:
        ownership.remove(target, ZARR_STORE)  # only a store of ours (checked just above)
        _upload_store(local, target)
    for local, target, kind in written:
        if kind != OUTPUT:
            continue
        try:
            target.put(local, exclusive=not overwrite)
        except FileExistsError:
            raise VirnucError(
                f"output {target} already exists; pass {option('overwrite')} to replace it. "
                f"{appeared(target)}"
            ) from None
    for local, target in stores:
        (target / ROOT).put(local / ROOT)


def _upload_store(local: Path, target: Remote) -> None:
    """Upload a local store but its root ``zarr.json``: the marker first, then the rest."""
    (target / ownership.MARKER).put(local / ownership.MARKER)
    for name in Local(local).files():
        if name not in (ROOT, ownership.MARKER):
            (target / name).put(local / name)
