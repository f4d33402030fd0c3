"""A shared cache of pooled embeddings, keyed by sequence digest, safe for writers at once.

A run looks every distinct sequence up first (:meth:`Namespace.lookup`), embeds only the
misses, and adds their embeddings as its chunks finish (:meth:`Namespace.add`). Several runs
(users, nodes) may share one cache at a time, in a local folder or at an fsspec URL: both go
through :func:`~virnuc_dask.storage.remote.place` and the methods of
:class:`~virnuc_dask.storage.places.Place`, so the rules below are written once.

Layout of a cache at ``LOCATION``::

    LOCATION/virnuc-dask-cache.json          the marker, {"format": 1}
    LOCATION/<namespace>/settings.json       the settings the namespace's numbers depend on
    LOCATION/<namespace>/segments/<id>.h5    immutable segments (digests and embeddings)
    LOCATION/<namespace>/entries/<id>.json   one entry per segment, written after it

Decisions:

- **Namespaces by settings**: an embedding depends on the model, its weights, the layers,
  the truncation, the stored dtype, ...: the caller says which in a JSON-able dict, and the
  namespace is the first 32 hex digits of the SHA-256 of ``json.dumps(settings,
  sort_keys=True)``. Two runs with the same settings share entries; any difference gives a
  namespace of its own, so a lookup can never return numbers made another way.
- **The entries are the index**: each segment's digests are in its own entry file, written
  whole in one atomic write (a rename, or one PUT) after its segment. There is no shared
  index file to update, so two writers never contend for one file and need no lock (object
  stores have no lock and no append), and a reader listing ``entries/`` sees whole entries
  only. A lookup lists the entries, reads those it has not read before (entries are
  immutable: a :class:`Namespace` keeps the ones it parsed) and searches their digests in
  memory (:mod:`~virnuc_dask.cache.index`).
- **Segment first, entry second**: a segment is built in a temporary file (a hidden
  ``.<id>.h5.partial`` beside it, renamed into place; at a URL a local temporary file put
  in one PUT) and its entry is written only once it is complete. A writer killed between
  the two leaves an orphan, a segment no entry names: readers never see it, and ``prune``
  removes it once it is an hour old (younger ones may be a writer between its two writes).
- **The oldest entry wins** where two runs added one digest at once (entries sorted by
  their time, then id), so every reader picks the same values.
- **Nothing used unchecked**: a segment is read whole, once, and its size, SHA-256, HDF5
  attributes and digests are checked against its entry before any value is handed out
  (:mod:`~virnuc_dask.cache.segments`). A damaged or foreign segment stops the read with a
  :class:`CacheError` naming it and the commands that find and remove such segments; the
  cache never silently returns numbers it cannot vouch for. A segment that vanished
  (pruned since the lookup) says so: looking the digests up again gives the truth.
- **Entries that cannot be used are skipped**, with a warning naming them: one that does not
  parse, names another namespace or segment, or has another format (a newer version's,
  which ``prune`` leaves alone).
- **Never the user's folder**: a cache is created only where nothing is or where its marker
  is; an existing folder that is not empty and has no marker is refused, and maintenance
  (:mod:`~virnuc_dask.cache.maintenance`) removes files only inside a marked cache. Without
  ``create``, a cache or namespace that does not exist is simply empty.
- **No Dask, no torch**: the store is numpy, h5py and places, so the driver, a worker or the
  command line can use it alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from virnuc_dask.cache.entries import DIGEST_SIZE, FORMAT, Entry, Unusable
from virnuc_dask.cache.index import DigestIndex
from virnuc_dask.cache.segments import Damaged, checked_embedding, file_digest, write_segment
from virnuc_dask.errors import VirnucError
from virnuc_dask.storage.local import Local
from virnuc_dask.storage.places import Place
from virnuc_dask.storage.remote import place
from virnuc_dask.storage.urls import StorageOptions

logger = logging.getLogger(__name__)

#: The marker file of a cache, at its top.
MARKER = "virnuc-dask-cache.json"

#: A namespace's name, a segment's or an entry's id: lower-case hex.
NAMESPACE_NAME = re.compile(r"^[0-9a-f]{32}$")
SEGMENT_FILE = re.compile(r"^([0-9a-f]{32})\.h5$")
PARTIAL_FILE = re.compile(r"^\.([0-9a-f]{32})\.h5\.partial$")
ENTRY_FILE = re.compile(r"^([0-9a-f]{32})\.json$")
#: What a killed local writer of an entry leaves (the rename's temporary, see ``Local``).
ENTRY_TEMPORARY = re.compile(r"^([0-9a-f]{32})\.json\..+\.tmp$")

#: Entry files read at once (an object store answers each GET in tens of milliseconds).
_READERS = 16


class CacheError(VirnucError):
    """A cache that cannot be used as asked: a folder of the user's, a damaged segment, ...

    Attributes
    ----------
    segment
        The segment concerned, when there is one (its place's text), else None.
    """

    def __init__(self, message: str, segment: str | None = None) -> None:
        super().__init__(message)
        self.segment = segment


def namespace_name(settings: dict) -> str:
    """The name of the namespace of ``settings``: 32 hex digits of their SHA-256."""
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class EmbeddingCache:
    """A cache of pooled embeddings in a local folder or at an fsspec URL.

    Parameters
    ----------
    location
        The cache's folder or URL (created when a namespace is asked for with ``create``).
    storage
        fsspec options of a URL: :class:`~virnuc_dask.storage.urls.StorageOptions`, or a
        dict of them.
    clock
        What gives the time recorded in new entries (seconds since the epoch).

    Attributes
    ----------
    location
        The cache's :class:`~virnuc_dask.storage.places.Place`.
    """

    def __init__(
        self,
        location: str | os.PathLike | Place,
        storage: StorageOptions | dict | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.location = place(location, StorageOptions.of(storage))
        self.clock = clock

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.location)!r})"

    def namespace(self, settings: dict, *, create: bool = False) -> Namespace:
        """The namespace of ``settings``.

        Parameters
        ----------
        settings
            What the embeddings depend on (model, weights, layers, dtype, ...), JSON values.
        create
            Create the cache (its marker) and the namespace (its ``settings.json``) where
            they are missing. Without it, a namespace that does not exist is empty (and
            :meth:`Namespace.add` creates it).

        Raises
        ------
        CacheError
            With ``create``: the location is a folder that is not empty and is not a cache,
            or a file; a cache of another format; a namespace whose settings differ.
        """
        found = Namespace(self, namespace_name(settings), settings)
        if create:
            found.create()
        return found

    def namespaces(self) -> list[Namespace]:
        """The namespaces in the cache, by name; none when there is no cache.

        A namespace folder whose ``settings.json`` cannot be read is skipped with a warning.

        Raises
        ------
        CacheError
            The location is not a cache (no marker) or of another format.
        """
        if not self.location.exists():
            return []
        self.require()
        found = []
        for folder in self.location.glob("*"):
            if not NAMESPACE_NAME.match(folder.name):
                continue
            try:
                settings = json.loads((folder / "settings.json").read_bytes())
            except (OSError, ValueError) as error:
                logger.warning(
                    "cache namespace %s skipped: its settings.json cannot be read (%s)",
                    folder,
                    error,
                )
                continue
            found.append(Namespace(self, folder.name, settings))
        return found

    def is_cache(self) -> bool:
        """Whether the location holds a cache's marker."""
        return (self.location / MARKER).is_file()

    def require(self) -> None:
        """Refuse a location that is not a cache of this format (before reading or removing).

        Raises
        ------
        CacheError
            No marker (the folder is not a cache; nothing in it is touched), or another format.
        """
        try:
            data = (self.location / MARKER).read_bytes()
        except FileNotFoundError:
            raise CacheError(
                f"{self.location} is not an embedding cache (it has no {MARKER}); nothing in "
                "it was touched: give the folder or URL of a cache"
            ) from None
        self._check_marker(data)

    def _check_marker(self, data: bytes) -> None:
        try:
            version = json.loads(data).get("format")
        except (ValueError, AttributeError):
            version = None
        if version != FORMAT:
            raise CacheError(
                f"{self.location / MARKER}: cache format {version!r}, this version reads "
                f"{FORMAT}; use another cache folder or the version of the tool that made it"
            )

    def create(self) -> None:
        """Create the cache (its folder and marker) where there is none.

        Raises
        ------
        CacheError
            The location is a file, or a folder that is not empty and has no marker.
        """
        marker = self.location / MARKER
        if marker.is_file():
            self._check_marker(marker.read_bytes())
            return
        if self.location.is_file():
            raise CacheError(f"cache {self.location} is a file; give a folder or a URL")
        if self.location.exists():
            # The marker's own temporary (another run creating the cache now) is not the
            # user's file; the marker itself may have appeared since the check above.
            others = [p for p in self.location.glob("*") if not p.name.startswith(MARKER)]
            if others and not marker.is_file():
                raise CacheError(
                    f"refusing to create a cache in {self.location}: the folder is not empty "
                    f"and holds no {MARKER}, so it may hold your files; nothing in it was "
                    "touched. Give a new or empty folder"
                )
        else:
            # A missing parent folder, a read-only one, a missing bucket: said plainly.
            self.location.check_writable("cache")
            self.location.mkdir(exist_ok=True)
        # Written whole (a rename, one PUT), never seen empty; two runs creating the cache at
        # once write the same bytes.
        if not marker.is_file():
            marker.write_bytes(json.dumps({"format": FORMAT}).encode())
        self._check_marker(marker.read_bytes())


@dataclass(frozen=True)
class Listing:
    """What a namespace's folders hold now.

    Attributes
    ----------
    entries
        The usable entries, oldest first (by time, then id).
    unusable
        ``(place, reason, foreign)`` of each entry file that cannot be used.
    files
        Every file of ``segments/`` and ``entries/`` (places), for the orphans.
    """

    entries: list[Entry]
    unusable: list[tuple[Place, str, bool]]
    files: list[Place]


class Namespace:
    """The entries of one set of settings: lookups, additions, and what maintenance needs.

    Made by :meth:`EmbeddingCache.namespace` or :meth:`EmbeddingCache.namespaces`.

    Attributes
    ----------
    name
        32 hex digits (:func:`namespace_name` of the settings).
    settings
        The settings, as given (or as read from ``settings.json``).
    folder
        The namespace's place, ``LOCATION/<name>``.
    """

    def __init__(self, cache: EmbeddingCache, name: str, settings: dict) -> None:
        self.cache, self.name, self.settings = cache, name, settings
        self.folder = cache.location / name
        self._parsed: dict[str, Entry] = {}
        self._created = False

    def __repr__(self) -> str:
        return f"Namespace({self.name!r} in {str(self.cache.location)!r})"

    # -- places --------------------------------------------------------------------------

    def segment_place(self, id: str) -> Place:
        """Where the segment ``id`` lies."""
        return self.folder / "segments" / f"{id}.h5"

    def entry_place(self, id: str) -> Place:
        """Where the entry of segment ``id`` lies."""
        return self.folder / "entries" / f"{id}.json"

    # -- reading -------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """The committed entries, oldest first; unusable ones skipped with a warning."""
        listing = self.listing(files=False)
        for where, reason, foreign in listing.unusable:
            what = "of another format, left alone" if foreign else "damaged, not used"
            logger.warning("cache entry %s skipped (%s): %s", where, what, reason)
        return listing.entries

    def listing(self, *, files: bool = True) -> Listing:
        """The entries (read where not read before) and, with ``files``, every file."""
        names = self.folder / "entries"
        places = [p for p in names.glob("*.json") if ENTRY_FILE.match(p.name)]
        # Copies of the memo (atomic in CPython): an add in another thread may change it.
        known = dict(self._parsed)
        fresh = [p for p in places if ENTRY_FILE.match(p.name).group(1) not in known]
        unusable = []
        if fresh:
            with ThreadPoolExecutor(min(_READERS, len(fresh))) as pool:
                read = list(pool.map(_read_or_none, fresh))
            for where, data in zip(fresh, read, strict=True):
                if data is None:  # removed since the listing (pruned)
                    continue
                id = ENTRY_FILE.match(where.name).group(1)
                try:
                    known[id] = self._parsed[id] = Entry.parse(data, id=id, namespace=self.name)
                except Unusable as error:
                    unusable.append((where, str(error), error.foreign))
        present = {ENTRY_FILE.match(p.name).group(1) for p in places}
        for id in set(known) - present:  # removed since (pruned)
            known.pop(id)
            self._parsed.pop(id, None)
        entries = sorted(known.values(), key=lambda e: (e.created, e.id))
        found = []
        if files:
            found = (self.folder / "segments").glob("*") + names.glob("*")
        return Listing(entries, unusable, found)

    def lookup(self, digests: np.ndarray) -> Hits:
        """Which of ``digests`` are cached, and where.

        Parameters
        ----------
        digests
            ``(n, 16)`` uint8: the sequences' BLAKE2b-128 digests.

        Returns
        -------
        Hits
            ``found`` for each digest; :meth:`Hits.blocks` reads the values.
        """
        digests = np.asarray(digests)
        if digests.dtype != np.uint8 or digests.ndim != 2 or digests.shape[1] != DIGEST_SIZE:
            raise ValueError(f"digests must be (n, {DIGEST_SIZE}) uint8, not {digests.shape}")
        entries = self.entries()
        index = DigestIndex([e.digests for e in entries])
        where = index.find(digests)
        found = where >= 0
        positions = np.flatnonzero(found)
        return Hits(
            self, entries, found, positions, index.entry[where[found]], index.row[where[found]]
        )

    # -- writing -------------------------------------------------------------------------

    def create(self) -> None:
        """Create the cache and this namespace where missing (``settings.json``, folders).

        Raises
        ------
        CacheError
            See :meth:`EmbeddingCache.namespace`.
        """
        if self._created:
            return
        self.cache.create()
        settings = self.folder / "settings.json"
        for folder in (self.folder, self.folder / "segments", self.folder / "entries"):
            folder.mkdir(exist_ok=True)
        if not settings.is_file():
            # Whole (never seen empty); two runs creating the namespace write the same bytes.
            settings.write_bytes(json.dumps(self.settings, sort_keys=True, indent=1).encode())
        try:
            theirs = namespace_name(json.loads(settings.read_bytes()))
        except ValueError:
            theirs = None
        if theirs != self.name:
            raise CacheError(
                f"{settings} does not hold the settings its namespace is named for; run "
                f"`virnuc-dask cache verify {self.cache.location}`"
            )
        self._created = True

    def add(self, digests: np.ndarray, embedding: np.ndarray) -> Entry | None:
        """Add sequences' embeddings: one new segment, then its entry.

        Parameters
        ----------
        digests
            ``(n, 16)`` uint8, digests not in the cache (the misses of a lookup).
        embedding
            ``(n, layers, width)``, in the dtype the run stores.

        Returns
        -------
        Entry or None
            The entry written; None when ``digests`` is empty (nothing is written).

        Raises
        ------
        CacheError
            See :meth:`create`; or the segment vanished before its entry was written (a
            prune that took it for an orphan).
        """
        digests = np.ascontiguousarray(digests)
        embedding = np.asarray(embedding)
        if digests.dtype != np.uint8 or digests.ndim != 2 or digests.shape[1] != DIGEST_SIZE:
            raise ValueError(f"digests must be (n, {DIGEST_SIZE}) uint8, not {digests.shape}")
        if embedding.ndim != 3 or len(embedding) != len(digests):
            raise ValueError(
                f"embedding must be ({len(digests)}, layers, width), not {embedding.shape}"
            )
        if len(digests) == 0:
            return None
        self.create()
        id = uuid.uuid4().hex
        segment = self.segment_place(id)
        size, sha256 = _publish_segment(segment, self.name, digests, embedding)
        entry = Entry(
            id=id,
            namespace=self.name,
            bytes=size,
            sha256=sha256,
            rows=len(digests),
            created=self.cache.clock(),
            digests=digests.copy(),
        )
        where = self.entry_place(id)
        where.write_bytes(entry.to_json())
        if not segment.exists():
            # Taken for an orphan by a prune while this writer stalled between its writes.
            where.unlink(missing_ok=True)
            raise CacheError(
                f"cache segment {segment} was removed before its entry was written; its "
                "sequences were not added (add them again)",
                segment=str(segment),
            )
        self._parsed[id] = entry
        return entry

    def remove(self, entry_id: str) -> None:
        """Remove an entry and then its segment (a reader never finds a segment it needs gone
        except in a race with this, which :meth:`Hits.blocks` reports)."""
        self.entry_place(entry_id).unlink(missing_ok=True)
        self.segment_place(entry_id).unlink(missing_ok=True)
        self._parsed.pop(entry_id, None)


def _read_or_none(where: Place) -> bytes | None:
    try:
        return where.read_bytes()
    except FileNotFoundError:
        return None


def _publish_segment(
    segment: Place, namespace: str, digests: np.ndarray, embedding: np.ndarray
) -> tuple[int, str]:
    """Build the segment in a temporary file and publish it whole; return its size and hash.

    Locally the temporary is a hidden sibling renamed into place (no copy); at a URL it is a
    local temporary file uploaded in one PUT. ``Place`` has no move of a local file, hence the
    one test of the kind here.
    """
    if isinstance(segment, Local):
        partial = segment.path.with_name(f".{segment.path.stem}.h5.partial")
        try:
            write_segment(partial, namespace, digests, embedding)
            found = file_digest(partial)
            os.replace(partial, segment.path)
        finally:
            partial.unlink(missing_ok=True)
        return found
    folder = tempfile.mkdtemp(prefix="virnuc-dask-segment-")
    try:
        local = Path(folder) / segment.name
        write_segment(local, namespace, digests, embedding)
        found = file_digest(local)
        segment.put(local)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return found


class Hits:
    """The result of a lookup: which digests are cached, and their values on demand.

    Attributes
    ----------
    found
        ``(n,)`` bool: whether each looked-up digest is cached.
    """

    def __init__(
        self,
        namespace: Namespace,
        entries: list[Entry],
        found: np.ndarray,
        positions: np.ndarray,
        entry: np.ndarray,
        row: np.ndarray,
    ) -> None:
        self.namespace, self.found = namespace, found
        self._entries, self._positions, self._entry, self._row = entries, positions, entry, row

    def __repr__(self) -> str:
        return f"Hits({self.count} of {len(self.found)})"

    @property
    def count(self) -> int:
        """How many of the digests are cached."""
        return len(self._positions)

    @property
    def segments(self) -> int:
        """How many segments :meth:`blocks` reads."""
        return len(np.unique(self._entry))

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The cached values, one segment at a time.

        Yields
        ------
        positions : np.ndarray
            Indexes into the looked-up digests (int64, increasing).
        embedding : np.ndarray
            Their embeddings, ``(len(positions), layers, width)``, row for row.

        Raises
        ------
        CacheError
            A segment is damaged or foreign (not used: the message says how to find and
            remove such segments), or vanished since the lookup (pruned meanwhile).
        """
        order = np.argsort(self._entry, kind="stable")
        entry = self._entry[order]
        cuts = np.flatnonzero(np.diff(entry)) + 1
        for group in np.split(order, cuts) if len(order) else []:
            record = self._entries[self._entry[group[0]]]
            embedding = read_segment(self.namespace, record)
            yield self._positions[group], embedding[self._row[group]]


def read_segment(namespace: Namespace, entry: Entry) -> np.ndarray:
    """The whole embedding of ``entry``'s segment, checked against the entry.

    Raises
    ------
    CacheError
        The segment is damaged or foreign, or gone.
    """
    segment = namespace.segment_place(entry.id)
    location = namespace.cache.location
    try:
        data = segment.read_bytes()
    except FileNotFoundError:
        raise CacheError(
            f"cache segment {segment} is gone (pruned since the lookup); look the sequences "
            "up again",
            segment=str(segment),
        ) from None
    try:
        return checked_embedding(data, entry)
    except Damaged as error:
        raise CacheError(
            f"cache segment {segment} is damaged ({error}) and was not used; run "
            f"`virnuc-dask cache verify {location}` and "
            f"`virnuc-dask cache prune --damaged {location}`",
            segment=str(segment),
        ) from None
