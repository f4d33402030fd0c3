"""Blending the overlapping windows of long sequences back into one output per sequence.

The window rule and the counts are :mod:`virnuc_dask.plan.windows`'; here each engine's list
of sequences becomes segments (one per window), and their outputs are blended per residue.

Decisions:

- **Blending.** A window's weight at a residue falls linearly from its centre to its edges
  (``min(i + 1, W - i)`` for the window's ``i``-th residue); each residue's weights over the
  windows that cover it are normalised to sum to 1 (in float64, then float32). This is a linear
  fade in the spirit of Brandes et al. (Nature Genetics 2023), who combine overlapping
  1,022-residue windows with weights that favour window centres; ours is the documented
  equivalent, not their code. A residue covered by one window gets the weight 1.0 exactly, so
  it holds that window's output bit for bit, and the outer residues of the sequence (covered
  only by the first or last window) keep their window's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from virnuc_dask.model.tokens import MODEL_WINDOW
from virnuc_dask.plan.windows import LONG_MODES, embedded_residues, window_counts, window_starts


@dataclass
class Segments:
    """The pieces the model sees: one per window (one per sequence when nothing is windowed).

    Attributes
    ----------
    sequence
        The sequence (position in the caller's list) of each segment.
    start, stop
        The residues ``start:stop`` of that sequence the segment holds.
    counts
        Segments per sequence.
    residues
        Residues embedded per sequence (the divisor of its pooled mean).
    window
        Residues per window.
    """

    sequence: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    counts: np.ndarray
    residues: np.ndarray
    window: int
    _weights: dict = field(default_factory=dict, repr=False)

    @property
    def lengths(self) -> np.ndarray:
        """Residues per segment."""
        return self.stop - self.start

    def pieces(self, segs: np.ndarray) -> list[tuple[int, int, int]]:
        """``(sequence, start, stop)`` of each of ``segs``: slice the sequence's bytes with it."""
        return list(
            zip(
                self.sequence[segs].tolist(),
                self.start[segs].tolist(),
                self.stop[segs].tolist(),
                strict=True,
            )
        )

    def blended(self, segments: np.ndarray) -> np.ndarray:
        """Whether each of ``segments`` belongs to a sequence of several windows (bool)."""
        return self.counts[self.sequence[segments]] > 1

    def weights(self, segs: np.ndarray) -> np.ndarray:
        """Blending weights (float32) of the residues of ``segs``, back to back.

        1.0 for the residues of a lone window; the weights of a windowed sequence are computed
        once per sequence and kept (a few kB per window).
        """
        parts = []
        for s in np.asarray(segs).tolist():
            q = int(self.sequence[s])
            if self.counts[q] == 1:
                parts.append(np.ones(int(self.stop[s] - self.start[s]), dtype=np.float32))
                continue
            if q not in self._weights:
                first = int(np.searchsorted(self.sequence, q))
                starts = self.start[first : first + int(self.counts[q])]
                table = blend_weights(starts, self.window, int(self.residues[q]))
                self._weights[q] = (first, table.astype(np.float32))
            first, table = self._weights[q]
            parts.append(table[s - first])
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)


def blend_weights(starts: np.ndarray, window: int, length: int) -> np.ndarray:
    """Normalised weights of windows at ``starts`` over their residues: ``(windows, window)``.

    Each window's raw weight is ``min(i + 1, window - i)`` for its ``i``-th residue; at each
    residue of the sequence the weights of the windows covering it are divided by their sum
    (float64). A residue covered by one window gets 1.0 exactly.
    """
    i = np.arange(window)
    raw = np.minimum(i + 1, window - i).astype(np.float64)
    total = np.zeros(length, dtype=np.float64)
    for s in starts:
        total[s : s + window] += raw
    return np.stack([raw / total[s : s + window] for s in starts])


def plan_segments(
    lengths: np.ndarray, window: int = MODEL_WINDOW, long: str = "truncate"
) -> Segments:
    """Cut sequences of ``lengths`` residues into the segments the model runs.

    Parameters
    ----------
    lengths
        Residues per sequence.
    window
        Residues per window (``max_residues``).
    long
        ``"truncate"``: one segment per sequence, its first ``window`` residues.
        ``"window"``: sequences longer than ``window`` become overlapping windows.
    """
    if long not in LONG_MODES:
        raise ValueError(f"long must be one of {LONG_MODES}, got {long!r}")
    lengths = np.asarray(lengths, dtype=np.int64)
    residues = embedded_residues(lengths, window, long)
    counts = window_counts(lengths, window, long)
    if long == "truncate" or (counts == 1).all():
        index = np.arange(len(lengths), dtype=np.int64)
        zero = np.zeros(len(lengths), dtype=np.int64)
        return Segments(index, zero, residues.copy(), counts, residues, window)
    sequence = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    start = np.concatenate([window_starts(int(n), window) for n in lengths])
    stop = np.minimum(start + window, lengths[sequence])
    return Segments(sequence, start, stop, counts, residues, window)


class Blender:
    """Gathers segments' outputs into per-sequence results, as batches come back.

    Pooled: each segment brings its contribution to its sequence's mean (its weighted residues
    summed, divided by the sequence's residue count); a lone window's is the mean itself and is
    stored as is, several windows' are added. Per-residue: a lone window's rows are handed on
    at once; a windowed sequence's weighted rows are added into a float32 buffer of its own,
    handed on when its last window has arrived.

    Parameters
    ----------
    segments
        The plan.
    pooled
        The caller's output ``(sequences, layers, dim)``, float32, written in place.
    on_residues
        Called with ``(sequences, values, counts)``: positions of whole sequences, their
        residues' rows back to back (``(counts.sum(), layers, dim)``, in ``dtype``) and their
        residue counts. None: per-residue values are not wanted.
    dtype
        Storage dtype of the rows handed to ``on_residues``.
    """

    def __init__(
        self,
        segments: Segments,
        pooled: np.ndarray,
        on_residues: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
        dtype: str = "float16",
    ) -> None:
        self.segments = segments
        self.pooled = pooled
        self.on_residues = on_residues
        self.dtype = np.dtype(dtype)
        # Windowed sequences still missing windows: their float32 rows and windows arrived.
        self._partial: dict[int, tuple[np.ndarray, int]] = {}

    def add(self, segs: np.ndarray, pooled: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Take a batch's outputs.

        Parameters
        ----------
        segs
            Segments of the batch, in the order of ``pooled`` and ``rows``.
        pooled
            Their pooled contributions ``(len(segs), layers, dim)``.
        rows
            Their residues' rows back to back (weighted for windowed sequences), or None.
        """
        plan = self.segments
        seqs = plan.sequence[segs]
        lone = plan.counts[seqs] == 1
        self.pooled[seqs[lone]] = pooled[lone]
        if not lone.all():
            np.add.at(self.pooled, seqs[~lone], pooled[~lone])
        if self.on_residues is None or rows is None:
            return
        sizes = plan.lengths[segs]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        if lone.all():
            self.on_residues(seqs, rows.astype(self.dtype, copy=False), sizes)
            return
        for i in np.flatnonzero(lone):
            block = rows[bounds[i] : bounds[i + 1]].astype(self.dtype, copy=False)
            self.on_residues(seqs[i : i + 1], block, sizes[i : i + 1])
        for i in np.flatnonzero(~lone):
            q = int(seqs[i])
            buffer, arrived = self._partial.get(q, (None, 0))
            if buffer is None:
                shape = (int(plan.residues[q]), *rows.shape[1:])
                buffer = np.zeros(shape, dtype=np.float32)
            s = segs[i]
            buffer[plan.start[s] : plan.stop[s]] += rows[bounds[i] : bounds[i + 1]]
            self._partial[q] = (buffer, arrived + 1)
            if arrived + 1 == plan.counts[q]:
                del self._partial[q]
                self.on_residues(
                    np.array([q]), buffer.astype(self.dtype, copy=False), plan.residues[q : q + 1]
                )
