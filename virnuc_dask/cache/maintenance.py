"""Keeping a cache in shape: what it holds (:func:`info`), whether every segment is sound
(:func:`verify`), and removing what is old, too much or damaged (:func:`prune`).

Decisions:

- **Only inside a marked cache**: every function first checks the cache's marker
  (:meth:`~virnuc_dask.cache.store.EmbeddingCache.require`), and :func:`prune` removes only
  files of the names the cache itself makes (entries, segments, their temporaries), so a
  mistyped location removes nothing of the user's.
- **Orphans are not damage**: a segment no entry names (a writer killed between its two
  writes, or one that has not written its entry *yet*) is reported as an orphan and never
  used. :func:`prune` removes orphans an hour old and more, never younger ones, whatever
  it is asked: a writer may be between its two writes.
- **Entries of another format are left alone** (a newer version's): reported, never removed
  as damaged.
- **An entry before its segment**: a reader that lists entries while a prune runs may still
  find an entry whose segment is gone; it reports that plainly
  (:meth:`~virnuc_dask.cache.store.Hits.blocks`). The other order would leave, for a moment,
  a segment without an entry, which is harmless, but a crash between the two removals would
  leave an entry that names nothing until the next verify.
- **Order of a prune**: damaged entries first (so that they do not count towards the size),
  then entries older than ``older_than``, then the oldest entries until the cache holds at
  most ``max_bytes`` (of committed segments, over all namespaces), then old orphans.
- **Age by the entry's time**: an entry's age is its ``created`` time, the writer's clock,
  not the file's, which an object store or a copy may change; an orphan (which has no
  entry) is aged by its file's modification time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from virnuc_dask.cache.entries import Entry
from virnuc_dask.cache.index import DigestIndex
from virnuc_dask.cache.segments import Damaged, checked_embedding
from virnuc_dask.cache.store import (
    ENTRY_FILE,
    ENTRY_TEMPORARY,
    NAMESPACE_NAME,
    PARTIAL_FILE,
    SEGMENT_FILE,
    EmbeddingCache,
    Listing,
    Namespace,
    namespace_name,
)
from virnuc_dask.storage.local import Local
from virnuc_dask.storage.places import Place

#: Orphans younger than this (seconds) may be a writer between its two writes: kept.
ORPHAN_GRACE = 3600.0

#: Settings printed first, in this order, when present.
_FIRST_SETTINGS = ("model", "layers", "dtype", "output_dtype")


@dataclass(frozen=True)
class Orphan:
    """A file of a namespace that no entry names (never used).

    Attributes
    ----------
    place
        The file.
    bytes
        Its size.
    modified
        When it was last written (seconds since the epoch).
    """

    place: Place
    bytes: int
    modified: float


@dataclass(frozen=True)
class NamespaceInfo:
    """What one namespace holds.

    Attributes
    ----------
    name, settings
        The namespace's name and settings.
    entries
        Usable entries.
    sequences
        Distinct digests over those entries.
    bytes
        Bytes of their segments.
    oldest, newest
        The first and last entry's time (seconds since the epoch), None when empty.
    orphans, orphan_bytes
        Files no entry names, and their bytes.
    unusable
        Entry files that cannot be used (damaged, or of another format).
    """

    name: str
    settings: dict | None
    entries: int
    sequences: int
    bytes: int
    oldest: float | None
    newest: float | None
    orphans: int
    orphan_bytes: int
    unusable: int

    def describe(self) -> list[str]:
        """The lines ``virnuc-dask cache info`` prints for this namespace."""
        lines = [f"namespace {self.name}: {describe_settings(self.settings)}"]
        held = (
            f"  {self.sequences:,} sequences in {self.entries:,} "
            f"entr{'y' if self.entries == 1 else 'ies'}, {human_bytes(self.bytes)}"
        )
        if self.oldest is not None:
            held += f"; oldest {_when(self.oldest)}, newest {_when(self.newest)}"
        lines.append(held)
        if self.orphans:
            lines.append(
                f"  {self.orphans:,} orphan file{'s' if self.orphans != 1 else ''} "
                f"({human_bytes(self.orphan_bytes)}): no entry names them, never used; "
                "prune removes them once an hour old"
            )
        if self.unusable:
            lines.append(
                f"  {self.unusable:,} entr{'y' if self.unusable == 1 else 'ies'} cannot be "
                "used: run virnuc-dask cache verify"
            )
        return lines


@dataclass(frozen=True)
class CacheInfo:
    """What a cache holds, namespace by namespace (:func:`info`).

    Attributes
    ----------
    location
        The cache's folder or URL, as text.
    namespaces
        One :class:`NamespaceInfo` each, by name.
    """

    location: str
    namespaces: list[NamespaceInfo] = field(default_factory=list)

    @property
    def entries(self) -> int:
        """Usable entries over all namespaces."""
        return sum(n.entries for n in self.namespaces)

    @property
    def sequences(self) -> int:
        """Distinct digests, summed over namespaces."""
        return sum(n.sequences for n in self.namespaces)

    @property
    def bytes(self) -> int:
        """Bytes of committed segments over all namespaces."""
        return sum(n.bytes for n in self.namespaces)

    @property
    def orphans(self) -> int:
        """Orphan files over all namespaces."""
        return sum(n.orphans for n in self.namespaces)

    @property
    def orphan_bytes(self) -> int:
        """Bytes of orphan files over all namespaces."""
        return sum(n.orphan_bytes for n in self.namespaces)

    def describe(self) -> list[str]:
        """The lines ``virnuc-dask cache info`` prints."""
        count = len(self.namespaces)
        lines = [
            f"cache {self.location}: {count} namespace{'s' if count != 1 else ''}, "
            f"{self.sequences:,} sequences in {self.entries:,} "
            f"entr{'y' if self.entries == 1 else 'ies'}, {human_bytes(self.bytes)}"
        ]
        if self.orphans:
            lines[0] += f"; {self.orphans:,} orphans ({human_bytes(self.orphan_bytes)})"
        for namespace in self.namespaces:
            lines += namespace.describe()
        return lines


@dataclass(frozen=True)
class Problem:
    """Something :func:`verify` found.

    Attributes
    ----------
    kind
        ``"damaged"`` (a segment, an entry or a namespace's settings that must not be used),
        ``"orphan"`` (a file no entry names: not damage) or ``"foreign"`` (an entry of
        another format: left alone).
    where
        The file concerned (its place's text).
    what
        What is wrong.
    namespace
        The namespace's name.
    entry
        The id of the entry concerned, when there is one.
    """

    kind: str
    where: str
    what: str
    namespace: str
    entry: str | None = None

    @property
    def damaged(self) -> bool:
        """Whether this is damage (not an orphan, not another format)."""
        return self.kind == "damaged"

    def __str__(self) -> str:
        return f"{self.kind}: {self.where}: {self.what}"


@dataclass(frozen=True)
class Removal:
    """An entry and its segment, or an orphan, that :func:`prune` removed (or would).

    Attributes
    ----------
    where
        The entry's file (or the orphan's), as text.
    reason
        ``"damaged"``, ``"older"``, ``"size"`` or ``"orphan"``.
    bytes
        Bytes freed (the segment's, or the orphan's; 0 where unknown).
    namespace
        The namespace's name.
    """

    where: str
    reason: str
    bytes: int
    namespace: str


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune` removed, or with ``dry_run`` would remove.

    Attributes
    ----------
    removed
        One :class:`Removal` each.
    dry_run
        True when nothing was removed.
    kept_entries, kept_bytes
        Entries and segment bytes left.
    """

    removed: list[Removal]
    dry_run: bool
    kept_entries: int
    kept_bytes: int

    @property
    def freed(self) -> int:
        """Bytes removed (or that would be)."""
        return sum(r.bytes for r in self.removed)

    def describe(self) -> list[str]:
        """The lines ``virnuc-dask cache prune`` prints."""
        verb = "would remove" if self.dry_run else "removed"
        reasons = {
            "damaged": "damaged",
            "older": "older than asked",
            "size": "oldest, over the size",
            "orphan": "orphans",
        }
        lines = [f"{verb} {r.where} ({reasons[r.reason]})" for r in self.removed]
        entries = sum(r.reason != "orphan" for r in self.removed)
        orphans = len(self.removed) - entries
        lines.append(
            f"{verb} {entries:,} entr{'y' if entries == 1 else 'ies'} and {orphans:,} "
            f"orphan{'s' if orphans != 1 else ''}, {human_bytes(self.freed)}; "
            f"kept {self.kept_entries:,} entr{'y' if self.kept_entries == 1 else 'ies'}, "
            f"{human_bytes(self.kept_bytes)}"
        )
        return lines


# -- the three operations -------------------------------------------------------------------


def info(cache: EmbeddingCache) -> CacheInfo:
    """What ``cache`` holds, namespace by namespace.

    Raises
    ------
    CacheError
        The location is not a cache.
    """
    cache.require()
    found = []
    for namespace in _namespaces(cache):
        listing = namespace.listing()
        entries = listing.entries
        found.append(
            NamespaceInfo(
                name=namespace.name,
                settings=namespace.settings,
                entries=len(entries),
                sequences=len(DigestIndex([e.digests for e in entries])),
                bytes=sum(e.bytes for e in entries),
                oldest=entries[0].created if entries else None,
                newest=entries[-1].created if entries else None,
                orphans=len(orphans := _orphans(listing)),
                orphan_bytes=sum(o.bytes for o in orphans),
                unusable=len(listing.unusable),
            )
        )
    return CacheInfo(str(cache.location), found)


def verify(cache: EmbeddingCache) -> list[Problem]:
    """Check every entry's segment (one at a time, read whole) and report what is wrong.

    Each entry's segment must exist, have the entry's size and SHA-256, open as HDF5, name
    the namespace, hold the entry's digests and an embedding of shape ``(rows, *, *)``.
    Entry files that cannot be used, namespaces whose ``settings.json`` is not theirs, and
    orphans are reported too.

    Raises
    ------
    CacheError
        The location is not a cache.
    """
    cache.require()
    problems = []
    for namespace in _namespaces(cache):
        if namespace.settings is None or namespace_name(namespace.settings) != namespace.name:
            problems.append(
                Problem(
                    "damaged",
                    str(namespace.folder / "settings.json"),
                    "missing, unreadable, or not the settings the namespace is named for",
                    namespace.name,
                )
            )
        listing = namespace.listing()
        problems += _unusable_problems(namespace, listing)
        for entry in listing.entries:
            reason = segment_damage(namespace, entry)
            if reason is not None:
                where = str(namespace.segment_place(entry.id))
                problems.append(Problem("damaged", where, reason, namespace.name, entry.id))
        for orphan in _orphans(listing):
            problems.append(
                Problem(
                    "orphan",
                    str(orphan.place),
                    "no entry names it (never used; prune removes it once an hour old)",
                    namespace.name,
                )
            )
    return problems


def prune(
    cache: EmbeddingCache,
    *,
    older_than: float | None = None,
    max_bytes: int | None = None,
    damaged: bool = False,
    dry_run: bool = False,
    now: float | None = None,
) -> PruneReport:
    """Remove damaged entries, entries older than ``older_than``, the oldest beyond
    ``max_bytes``, and orphans an hour old (see the module's decisions for the order).

    Parameters
    ----------
    cache
        The cache.
    older_than
        Remove entries made more than this many seconds ago.
    max_bytes
        Then remove the oldest entries until the segments left hold at most this many bytes.
    damaged
        First remove the entries whose segments :func:`verify` finds damaged (and entry files
        that are damaged); entries of another format stay.
    dry_run
        Report what would be removed; remove nothing.
    now
        The time to age entries and orphans by (seconds since the epoch; default: now).

    Raises
    ------
    CacheError
        The location is not a cache.
    """
    cache.require()
    now = time.time() if now is None else now
    # (namespace, an entry's id or an orphan's place, removal), in the order of removal.
    removals: list[tuple[Namespace, str | Place, Removal]] = []
    kept: list[tuple[Namespace, Entry]] = []
    listings = [(namespace, namespace.listing()) for namespace in _namespaces(cache)]

    def remove(namespace: Namespace, id: str, where: str, reason: str, size: int) -> None:
        removals.append((namespace, id, Removal(where, reason, size, namespace.name)))

    for namespace, listing in listings:
        if damaged:
            for problem in _unusable_problems(namespace, listing):
                if problem.damaged:
                    remove(namespace, problem.entry, problem.where, "damaged", 0)
        for entry in listing.entries:
            where = str(namespace.entry_place(entry.id))
            if damaged and segment_damage(namespace, entry) is not None:
                remove(namespace, entry.id, where, "damaged", entry.bytes)
            elif older_than is not None and now - entry.created > older_than:
                remove(namespace, entry.id, where, "older", entry.bytes)
            else:
                kept.append((namespace, entry))
    if max_bytes is not None:
        kept.sort(key=lambda pair: (pair[1].created, pair[1].id))
        total = sum(entry.bytes for _, entry in kept)
        while kept and total > max_bytes:
            namespace, entry = kept.pop(0)
            total -= entry.bytes
            remove(namespace, entry.id, str(namespace.entry_place(entry.id)), "size", entry.bytes)
    gone = {(namespace.name, id) for namespace, id, _ in removals}
    for namespace, listing in listings:
        for orphan in _orphans(listing):
            if (namespace.name, _file_id(orphan.place.name)) in gone:
                continue  # removed with its entry
            if now - orphan.modified >= ORPHAN_GRACE:
                removal = Removal(str(orphan.place), "orphan", orphan.bytes, namespace.name)
                removals.append((namespace, orphan.place, removal))
    if not dry_run:
        for namespace, target, _ in removals:
            if isinstance(target, str):
                namespace.remove(target)  # the entry, then its segment
            else:
                target.unlink(missing_ok=True)
    removed = [removal for _, _, removal in removals]
    return PruneReport(removed, dry_run, len(kept), sum(entry.bytes for _, entry in kept))


# -- shared steps ---------------------------------------------------------------------------


def segment_damage(namespace: Namespace, entry: Entry) -> str | None:
    """What is wrong with ``entry``'s segment, or None when it is sound (read whole)."""
    try:
        data = namespace.segment_place(entry.id).read_bytes()
    except FileNotFoundError:
        return "the segment its entry names is missing"
    try:
        checked_embedding(data, entry)
    except Damaged as error:
        return str(error)
    return None


def _namespaces(cache: EmbeddingCache) -> list[Namespace]:
    """Every namespace folder, its settings None where ``settings.json`` cannot be read."""
    found = []
    for folder in cache.location.glob("*"):
        if not NAMESPACE_NAME.match(folder.name):
            continue
        try:
            settings = json.loads((folder / "settings.json").read_bytes())
        except (OSError, ValueError):
            settings = None
        found.append(Namespace(cache, folder.name, settings))
    return found


def _unusable_problems(namespace: Namespace, listing: Listing) -> list[Problem]:
    found = []
    for where, reason, foreign in listing.unusable:
        id = ENTRY_FILE.match(where.name).group(1)
        kind = "foreign" if foreign else "damaged"
        found.append(Problem(kind, str(where), f"entry {reason}", namespace.name, id))
    return found


def _file_id(name: str) -> str | None:
    for pattern in (SEGMENT_FILE, PARTIAL_FILE, ENTRY_TEMPORARY, ENTRY_FILE):
        found = pattern.match(name)
        if found:
            return found.group(1)
    return None


def _orphans(listing: Listing) -> list[Orphan]:
    """The files of the cache's own names that no entry file names (usable or not)."""
    named = {e.id for e in listing.entries}
    named |= {ENTRY_FILE.match(where.name).group(1) for where, _, _ in listing.unusable}
    found = []
    for where in listing.files:
        name = where.name
        segment = SEGMENT_FILE.match(name)
        if segment and segment.group(1) in named:
            continue
        if not (segment or PARTIAL_FILE.match(name) or ENTRY_TEMPORARY.match(name)):
            continue  # an entry, or a name the cache does not make: never touched
        try:
            found.append(Orphan(where, _size(where), where.modified()))
        except FileNotFoundError:
            continue  # renamed or removed since the listing
    return found


def _size(where: Place) -> int:
    """A file's size (``Place`` has no such method: the two ways are here)."""
    if isinstance(where, Local):
        return os.stat(where.path).st_size
    return int(where.fs.size(where.path))


# -- text -----------------------------------------------------------------------------------


def describe_settings(settings: dict | None) -> str:
    """The settings as a line: ``model``, ``layers``, ``dtype``, ... first, then the rest."""
    if not settings:
        return "no settings recorded" if settings is None else "{}"
    names = [n for n in _FIRST_SETTINGS if n in settings]
    names += sorted(n for n in settings if n not in _FIRST_SETTINGS)
    return ", ".join(f"{name} {_setting(settings[name])}" for name in names)


def human_bytes(count: int) -> str:
    """``count`` bytes in decimal units (``12.3 MB``)."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _setting(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)
