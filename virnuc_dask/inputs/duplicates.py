"""Duplicate ids: found through sorted 64-bit hashes, then refused or renamed ``ID.2``, ...

The output is indexed by id, so an id seen twice is an error unless the user asks to keep both
(``duplicate_ids="suffix"``). No set of strings is built: the ids' hashes are sorted and only
equal hashes are compared as bytes, so memory stays bounded by the duplicates.

The functions work on any *id table*: an object with ``id_bytes`` (uint8, all ids back to
back), ``id_offsets`` (int64, ``len + 1``), ``file`` and ``line`` (per id: input number and
1-based line, for messages) and ``inputs`` (the input paths): a
:class:`~virnuc_dask.inputs.fasta.FastaIndex`, or the table of reads of the reads front end.
"""

from __future__ import annotations

import numpy as np

from virnuc_dask.errors import VirnucError
from virnuc_dask.inputs.staging import shown

#: What to do with an id seen twice: refuse the input, or keep both by suffixing.
DUPLICATE_POLICIES = ("error", "suffix")
_SHOWN_ID = 60  # characters of an id quoted in a message


def shown_id(ident: str) -> str:
    """An id as a message quotes it: at most 60 characters."""
    return ident if len(ident) <= _SHOWN_ID else ident[: _SHOWN_ID - 3] + "..."


def id_bytes(table, row: int) -> bytes:
    """The UTF-8 bytes of id ``row`` of an id table."""
    return table.id_bytes[table.id_offsets[row] : table.id_offsets[row + 1]].tobytes()


def check_duplicates(
    table, hashes: np.ndarray, policy: str, *, what: str = "id", hint: str = ""
) -> None:
    """Find ids seen twice via their hashes (Python's ``hash`` of the bytes), then act.

    Parameters
    ----------
    table
        An id table (see the module's docstring); renamed ids are written back into it.
    hashes
        ``hash(id_bytes)`` of every id, int64.
    policy
        ``"error"`` or ``"suffix"`` (rename later occurrences ``ID.2``, ``ID.3``, ...).
    what
        How messages call an id (``"id"``, ``"read id"``).
    hint
        Appended to the message, e.g. when ids of paired reads coincide.

    Raises
    ------
    VirnucError
        With ``policy="error"``, naming the id and both places.
    """
    order = np.argsort(hashes)  # equal hashes are compared by row below: no stable sort needed
    sorted_hashes = hashes[order]
    same = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
    if not len(same):
        return
    candidates = np.unique(np.concatenate([order[same], order[same + 1]]))
    seen: dict[bytes, int] = {}
    duplicates: list[int] = []
    for row in sorted(candidates.tolist()):
        ident = id_bytes(table, row)
        first = seen.setdefault(ident, row)
        if first == row:
            continue
        if policy == "error":
            raise VirnucError(
                f"duplicate {what} {shown_id(ident.decode())!r}: "
                f"{shown(table.inputs[table.file[first]])} line {table.line[first]} and "
                f"{shown(table.inputs[table.file[row]])} line {table.line[row]}; make ids unique "
                f"or use --duplicate-ids suffix{hint}"
            )
        duplicates.append(row)
    if duplicates:  # else only hash collisions of different ids
        _suffix_duplicates(table, sorted_hashes, order, duplicates)


def _suffix_duplicates(
    table, sorted_hashes: np.ndarray, order: np.ndarray, duplicates: list[int]
) -> None:
    """Rename later occurrences of an id ``ID.2``, ``ID.3``, ... skipping names in use.

    Whether a name is in use is looked up through the sorted hashes, so memory stays bounded
    by the duplicates, not by the number of sequences.
    """
    new_names: set[bytes] = set()

    def in_use(name: bytes) -> bool:
        if name in new_names:
            return True
        h = hash(name)
        lo = int(np.searchsorted(sorted_hashes, h, side="left"))
        hi = int(np.searchsorted(sorted_hashes, h, side="right"))
        return any(id_bytes(table, int(order[i])) == name for i in range(lo, hi))

    renamed: dict[int, bytes] = {}
    counts: dict[bytes, int] = {}
    for row in duplicates:
        ident = id_bytes(table, row)
        k = counts.get(ident, 1) + 1
        while in_use(ident + b".%d" % k):
            k += 1
        counts[ident] = k
        renamed[row] = ident + b".%d" % k
        new_names.add(renamed[row])
    # Copy the unchanged runs of ids between renamed rows as whole blocks.
    lengths = np.diff(table.id_offsets)
    pieces, previous = [], 0
    for row, name in sorted(renamed.items()):
        pieces.append(table.id_bytes[table.id_offsets[previous] : table.id_offsets[row]].tobytes())
        pieces.append(name)
        lengths[row] = len(name)
        previous = row + 1
    pieces.append(table.id_bytes[table.id_offsets[previous] :].tobytes())
    table.id_bytes = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    table.id_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
