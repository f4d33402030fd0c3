"""An entry: the committed record of one segment, and the only index the cache has.

An entry is a small JSON file, ``<namespace>/entries/<id>.json``, written whole (a rename, or
one PUT) only after its segment is complete. It names the segment, its size and SHA-256, its
row count, when it was made, and the segment's digests (base64 of the ``rows * 16`` bytes), so
that a lookup reads entries only and opens no segment it does not use.

Decisions:

- **Parsing is strict**: a field missing or of the wrong type, another format, or a digest
  count that disagrees with ``rows`` makes the entry unusable (:class:`Unusable`, with the
  reason); the caller skips it and says so. An entry is never half-used.
- **Another format is not damage**: a newer version of the tool may write entries this one
  cannot read; they are skipped and left alone (:attr:`Unusable.foreign`), never pruned as
  damaged.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

import numpy as np

#: The format of entries, segments and the cache's marker that this version reads and writes.
FORMAT = 1

#: Bytes in one digest (BLAKE2b-128 of a sequence).
DIGEST_SIZE = 16


class Unusable(ValueError):
    """An entry that cannot be used, with the reason.

    Attributes
    ----------
    foreign
        True when the entry is of another format (left alone), False when it is damaged.
    """

    def __init__(self, reason: str, *, foreign: bool = False) -> None:
        super().__init__(reason)
        self.foreign = foreign


@dataclass(frozen=True, eq=False)
class Entry:
    """One committed segment of a namespace, as its entry file describes it.

    Attributes
    ----------
    id
        The segment's id (a uuid4 in hex): the names ``segments/<id>.h5`` and
        ``entries/<id>.json``.
    namespace
        The namespace the entry belongs to.
    bytes
        The segment file's size.
    sha256
        The segment file's SHA-256, in hex.
    rows
        Sequences in the segment.
    created
        When the entry was written, in seconds since the epoch (the writer's clock).
    digests
        The segment's digests, ``(rows, 16)`` uint8, in the segment's row order.
    """

    id: str
    namespace: str
    bytes: int
    sha256: str
    rows: int
    created: float
    digests: np.ndarray = field(repr=False)

    def to_json(self) -> bytes:
        """The entry file's bytes."""
        record = {
            "format": FORMAT,
            "namespace": self.namespace,
            "segment": self.id,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "rows": self.rows,
            "created": self.created,
            "digests": base64.b64encode(np.ascontiguousarray(self.digests).tobytes()).decode(),
        }
        return json.dumps(record).encode()

    @classmethod
    def parse(cls, data: bytes, *, id: str, namespace: str) -> Entry:
        """The entry in ``data``, read from ``entries/<id>.json`` of ``namespace``.

        Raises
        ------
        Unusable
            With the reason: not JSON, another format (``foreign``), another namespace or
            segment than its place says, a field missing or wrong, digests that do not match
            ``rows``.
        """
        try:
            record = json.loads(data)
        except ValueError:
            raise Unusable("not valid JSON") from None
        if not isinstance(record, dict):
            raise Unusable("not a JSON object")
        if record.get("format") != FORMAT:
            raise Unusable(
                f"format {record.get('format')!r}, this version reads {FORMAT}", foreign=True
            )
        if record.get("namespace") != namespace:
            raise Unusable(f"names namespace {record.get('namespace')!r}, it lies in {namespace}")
        if record.get("segment") != id:
            raise Unusable(f"names segment {record.get('segment')!r}, its file name says {id}")
        kinds = {"bytes": int, "sha256": str, "rows": int, "created": (int, float), "digests": str}
        for name, kind in kinds.items():
            value = record.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise Unusable(f"field {name!r} is missing or of the wrong type")
        try:
            raw = base64.b64decode(record["digests"], validate=True)
        except (binascii.Error, ValueError):
            raise Unusable("its digests are not base64") from None
        if record["rows"] < 0 or len(raw) != record["rows"] * DIGEST_SIZE:
            raise Unusable(f"holds {len(raw) // DIGEST_SIZE} digests for {record['rows']} rows")
        digests = np.frombuffer(raw, dtype=np.uint8).reshape(-1, DIGEST_SIZE)
        return cls(
            id=id,
            namespace=namespace,
            bytes=record["bytes"],
            sha256=record["sha256"],
            rows=record["rows"],
            created=float(record["created"]),
            digests=digests,
        )
