"""A segment: one immutable HDF5 file of digests and their pooled embeddings.

``<namespace>/segments/<id>.h5`` holds two datasets, ``digest`` ``(n, 16)`` uint8 and
``embedding`` ``(n, layers, width)`` of the run's output dtype, and the attributes ``format``
and ``namespace``. It is written once, whole, and never changed.

Decisions:

- **Built locally, published whole**: h5py writes to a local file (it cannot write an object
  store); the file is then renamed into place (local) or uploaded in one PUT (a URL), so no
  reader ever sees a segment half-written (:mod:`virnuc_dask.cache.store` does the publishing).
- **Checked before use, every time**: a reader has the whole file's bytes in hand (one read)
  and checks their size and SHA-256 against the entry, then that the HDF5 opens, names the
  namespace, holds exactly the entry's digests and one embedding row per digest
  (:func:`checked_embedding`). Only then is any value handed out. The check costs one hash
  of bytes already in memory (about 1 GB/s), small beside reading them.
- **Contiguous, uncompressed**: pooled embeddings of different sequences do not compress, and
  a segment is always read whole.
"""

from __future__ import annotations

import hashlib
import io
import os

import h5py
import numpy as np

from virnuc_dask.cache.entries import DIGEST_SIZE, FORMAT, Entry


class Damaged(Exception):
    """A segment that must not be used, with the reason (the caller names the segment)."""


def write_segment(
    path: str | os.PathLike, namespace: str, digests: np.ndarray, embedding: np.ndarray
) -> None:
    """Write a segment to the local file ``path`` (created or replaced).

    Parameters
    ----------
    path
        A local file (the caller publishes it).
    namespace
        The namespace's name, recorded in the ``namespace`` attribute.
    digests
        ``(n, 16)`` uint8.
    embedding
        ``(n, layers, width)``, stored in its own dtype.
    """
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["namespace"] = namespace
        f.create_dataset("digest", data=digests)
        f.create_dataset("embedding", data=embedding)


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """The size and SHA-256 (hex) of a local file."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def checked_embedding(data: bytes, entry: Entry) -> np.ndarray:
    """The ``embedding`` of the segment whose bytes are ``data``, once it passes every check.

    Raises
    ------
    Damaged
        The size or SHA-256 differs from the entry's, the HDF5 does not open, its attributes
        name another format or namespace, its digests are not the entry's, or its embedding
        does not have one row per digest.
    """
    if len(data) != entry.bytes:
        raise Damaged(f"it has {len(data)} bytes, its entry says {entry.bytes}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise Damaged("its SHA-256 differs from its entry's")
    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise Damaged(f"its format is {f.attrs.get('format')!r}, not {FORMAT}")
            found = f.attrs.get("namespace")
            found = found.decode() if isinstance(found, bytes) else found
            if found != entry.namespace:
                raise Damaged(f"it belongs to namespace {found!r}, not {entry.namespace}")
            if "digest" not in f or "embedding" not in f:
                raise Damaged("it lacks its digest or embedding dataset")
            digests = f["digest"][()]
            if digests.shape != (entry.rows, DIGEST_SIZE) or not np.array_equal(
                digests, entry.digests
            ):
                raise Damaged("its digests are not those of its entry")
            dataset = f["embedding"]
            if dataset.ndim != 3 or dataset.shape[0] != entry.rows:
                raise Damaged(f"its embedding has shape {dataset.shape}, not ({entry.rows}, *, *)")
            return dataset[()]
    except Damaged:
        raise
    except Exception as error:  # noqa: BLE001 (h5py raises several types for a broken file)
        raise Damaged(f"its HDF5 does not open ({type(error).__name__}: {error})") from None
