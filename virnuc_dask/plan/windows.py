"""Windows: sequences longer than the model's window, embedded in overlapping pieces.

With ``long="window"`` a sequence of ``L > W`` residues (``W`` = ``max_residues``, 1,022 by
default) is cut into overlapping windows of exactly ``W`` residues; each window is an ordinary
sequence for the engines (its own BOS and EOS, one packed segment or one padded row), so there
is no second code path for long sequences. Their per-residue outputs are blended, and the pooled
vector is the mean over all ``L`` residues of the blended per-residue output.

Decisions:

- **Stride.** At most ``W // 2`` (511 residues for 1,022): every residue away from the ends of
  the sequence sees at least a quarter window of context on each side in some window. The
  ``n = ceil((L - W) / (W // 2)) + 1`` windows are spread evenly between ``0`` and ``L - W``
  (starts rounded), so every window has ``W`` residues and the overlaps are equal to within
  one residue: no short last window with little context. A 2,000-residue sequence has windows
  at 0, 489 and 978; 50,000 residues, 97 windows (about 2x the residues in compute).
- **Short sequences are untouched.** A sequence of at most ``W`` residues is one window of
  weight 1 in both modes, and the engines then skip the multiplication altogether: the result
  is identical, bit for bit, with ``long="truncate"``.
- Blending happens on the host in float32 (:class:`Blender`): the windows of one sequence may
  land in different batches, and only sequences with several windows pay for it.

The blending itself is the engines' (:mod:`virnuc_dask.engine.blend`); this module holds the
rule and the counts the driver plans with.
"""

from __future__ import annotations

import numpy as np

from virnuc_dask.model.tokens import MODEL_WINDOW

#: How sequences longer than the window are handled.
LONG_MODES = ("truncate", "window")


#: The rule, in words, recorded in outputs made with ``long="window"``.
WINDOWS_RULE = (
    "windows of max_residues residues, stride at most max_residues // 2, spread evenly; "
    "per-residue outputs blended with weights falling linearly to the window edges, "
    "normalised per residue; pooled = mean of the blended residues"
)


def window_starts(length: int, window: int = MODEL_WINDOW) -> np.ndarray:
    """Where the windows of a sequence of ``length`` residues start (int64, ascending).

    One window at 0 when ``length <= window``; else windows of exactly ``window`` residues,
    strides of at most ``window // 2``, spread evenly from 0 to ``length - window``.
    """
    if length <= window:
        return np.zeros(1, dtype=np.int64)
    stride = max(1, window // 2)
    count = -(-(length - window) // stride) + 1
    return np.rint(np.linspace(0, length - window, count)).astype(np.int64)


def window_counts(lengths: np.ndarray, window: int = MODEL_WINDOW, long: str = "truncate"):
    """Windows per sequence (int32): 1 for every sequence in ``truncate`` mode."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if long == "truncate":
        return np.ones(len(lengths), dtype=np.int32)
    stride = max(1, window // 2)
    extra = np.maximum(lengths - window, 0)
    return (-(-extra // stride) + 1).astype(np.int32)


def embedded_residues(lengths: np.ndarray, window: int = MODEL_WINDOW, long: str = "truncate"):
    """Residues embedded per sequence (int64): the first ``window`` when truncating, else all."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.minimum(lengths, window) if long == "truncate" else lengths.copy()


def model_tokens(lengths: np.ndarray, window: int = MODEL_WINDOW, long: str = "truncate"):
    """Tokens each sequence costs the model (int64): its windows' residues plus 2 per window."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if long == "truncate":
        return np.minimum(lengths, window) + 2
    counts = window_counts(lengths, window, long).astype(np.int64)
    return np.where(counts > 1, counts * (window + 2), lengths + 2)
