"""Partition: length-sorted sequences dealt by stride over workers and cut into chunks.

Sorting by length (longest first) keeps the sequences of a chunk, and so of a batch, alike in
length. Dealing that order round-robin over ``W`` workers gives every worker the same mix of
lengths, so no worker is left with all the long proteins. Each worker's share is then cut into
chunks of about ``chunk_tokens`` tokens: the unit of a Dask task, of a shard file and of resume.

The chunks are plain descriptions (a range of positions in ``order``), so the task graph stays
small whatever the number of sequences. The chunks are not pinned to the worker they were dealt
to: Dask's dynamic scheduling balances them, and a lost worker's chunks can run anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from virnuc_dask.model.tokens import MODEL_WINDOW
from virnuc_dask.plan.windows import model_tokens


@dataclass(frozen=True)
class Chunk:
    """One task's work: positions ``start:stop`` of the partition's ``order``.

    Attributes
    ----------
    number
        The chunk's number, which names its shard file.
    start, stop
        Range of positions in :attr:`Partition.order`.
    tokens
        Tokens in the chunk (residues after truncation plus BOS and EOS).
    lane
        The worker lane the chunk was dealt to (a balance report, not a placement).
    """

    number: int
    start: int
    stop: int
    tokens: int
    lane: int

    @property
    def size(self) -> int:
        """Sequences in the chunk."""
        return self.stop - self.start

    def describe(self, first_ids: list[str]) -> str:
        """The chunk in a message: ``chunk 3 (120 sequences: a, b, c, d, e and 115 more)``.

        ``first_ids``: the ids of its first sequences (five are shown).
        """
        shown = list(first_ids)[:5]
        more = f" and {self.size - len(shown)} more" if self.size > len(shown) else ""
        return f"chunk {self.number} ({self.size} sequences: {', '.join(shown)}{more})"


@dataclass
class Partition:
    """Sequences in processing order and the chunks that cover them.

    Attributes
    ----------
    order
        Input rows (int64) in processing order: lane 0's rows, then lane 1's, ...
        each lane longest first.
    chunks
        Consecutive ranges of ``order``, covering it once.
    lanes
        Number of worker lanes dealt to.
    """

    order: np.ndarray
    chunks: list[Chunk]
    lanes: int

    def lane_tokens(self) -> np.ndarray:
        """Tokens dealt to each lane."""
        totals = np.zeros(self.lanes, dtype=np.int64)
        for chunk in self.chunks:
            totals[chunk.lane] += chunk.tokens
        return totals

    def balance(self) -> float:
        """Max over mean tokens per lane: 1.0 is a perfect balance."""
        totals = self.lane_tokens()
        return float(totals.max() / totals.mean()) if totals.sum() else 1.0


def sequence_tokens(
    lengths: np.ndarray, max_residues: int = MODEL_WINDOW, long: str = "truncate"
) -> np.ndarray:
    """Tokens each sequence costs the model: residues after truncation, plus BOS and EOS.

    With ``long="window"``, a longer sequence costs its windows' residues and BOS and EOS each.
    """
    return model_tokens(lengths, max_residues, long)


def default_chunk_tokens(total_tokens: int, lanes: int) -> int:
    """A chunk size that gives each lane at least 8 chunks, between 4,096 and 2 million tokens.

    Eight or more chunks per worker keep the tail of a run short and resume fine-grained; two
    million tokens is about 20 seconds of ESM-2 3B on a fast GPU.
    """
    return int(np.clip(total_tokens // (8 * max(lanes, 1)), 4096, 2_000_000))


def partition(
    lengths: np.ndarray,
    lanes: int,
    chunk_tokens: int | None = None,
    max_residues: int = MODEL_WINDOW,
    long: str = "truncate",
    rows: np.ndarray | None = None,
) -> Partition:
    """Sort by length, deal round-robin over ``lanes`` workers, cut each share into chunks.

    Parameters
    ----------
    lengths
        Residues per sequence, in input order.
    lanes
        Workers to deal to (at least 1).
    chunk_tokens
        Token budget of one chunk; default :func:`default_chunk_tokens`. A sequence larger
        than the budget is a chunk of its own.
    max_residues
        Truncation window, for counting tokens.
    long
        How longer sequences are embedded (``"window"``: their windows' tokens count).
    rows
        The input rows to embed, ascending (default: all): the distinct sequences, less those
        an embedding cache holds. ``order`` holds only these.
    """
    if lanes < 1:
        raise ValueError(f"lanes must be at least 1, got {lanes}")
    rows = np.arange(len(lengths)) if rows is None else np.asarray(rows, dtype=np.int64)
    tokens = np.zeros(len(lengths), dtype=np.int64)
    tokens[rows] = sequence_tokens(np.asarray(lengths)[rows], max_residues, long)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(int(tokens.sum()), lanes)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    by_length = rows[np.argsort(-tokens[rows], kind="stable")]
    shares = [by_length[lane::lanes] for lane in range(lanes)]
    order = np.concatenate(shares) if shares else np.empty(0, dtype=np.int64)
    chunks: list[Chunk] = []
    base = 0
    for lane, share in enumerate(shares):
        cumulative = np.cumsum(tokens[share])
        # Cut where the running total crosses each multiple of the budget.
        cuts = np.searchsorted(
            cumulative,
            np.arange(chunk_tokens, cumulative[-1], chunk_tokens) if len(share) else [],
            side="right",
        )
        bounds = np.unique(np.concatenate([[0], cuts, [len(share)]]))
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            if stop > start:
                chunk_sum = int(cumulative[stop - 1] - (cumulative[start - 1] if start else 0))
                chunks.append(
                    Chunk(len(chunks), base + int(start), base + int(stop), chunk_sum, lane)
                )
        base += len(share)
    return Partition(order=order.astype(np.int64), chunks=chunks, lanes=lanes)
