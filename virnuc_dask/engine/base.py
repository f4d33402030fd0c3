"""The engine base: the one loop that turns a list of sequences into pooled embeddings.

Every engine runs the same steps: cut the sequences into segments (one per window,
:func:`~virnuc_dask.engine.blend.plan_segments`), sort them longest first, cut them into
token-budget batches (:mod:`virnuc_dask.engine.batching`), run each batch, hand its outputs to
the :class:`~virnuc_dask.engine.blend.Blender` and report it to ``on_batch``.
:meth:`Engine.embed` holds these steps once; an engine says how one batch runs, in three hooks:

- ``_stage(run, segs)`` prepares a batch (the packed engine tokenises it into pinned memory
  and starts its upload);
- ``_launch(staged)`` starts its computation and returns what is pending: one entry, or
  several where a batch was split (the packed engine halves a batch that runs out of memory);
- ``_collect(pending)`` waits for a pending batch and returns its outputs on the host, a
  :class:`BatchOutput`.

Decisions:

- **One batch in flight, where an engine asks.** The loop launches batch ``i``, stages batch
  ``i + 1``, then collects launched batches until :attr:`Engine.lookahead` remain. The packed
  engine keeps one (while the device computes batch ``i`` the host prepares ``i + 1`` and
  collects ``i - 1``); the reference engine keeps none, so each batch is blended and reported
  before the next one runs, and an error in a batch comes after every earlier batch was
  reported.
- **Longest first.** Segments are sorted by length (a stable sort) before the batches are cut,
  so a padded batch holds sequences of similar lengths; rows still come back in the caller's
  order, since the blender writes each segment's output to its sequence's row.
- **The call's inputs travel as a** :class:`Run` passed to the hooks, not as state on the
  engine between batches.
- ``long`` is checked for every call, an empty input included.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from virnuc_dask.engine.batching import token_budget_batches
from virnuc_dask.engine.blend import Blender, Segments, plan_segments


@dataclass(frozen=True)
class Run:
    """One :meth:`Engine.embed` call's inputs, read by its batches.

    Attributes
    ----------
    sequences
        The caller's sequences.
    plan
        Their segments.
    residues
        Whether per-residue rows are wanted.
    residue_dtype
        Storage dtype of those rows (a numpy name: ``float16``, ``float32``).
    """

    sequences: list[bytes]
    plan: Segments
    residues: bool
    residue_dtype: str

    def pieces(self, segs: np.ndarray) -> list[bytes]:
        """The residues of each of ``segs``, sliced from their sequences."""
        return [self.sequences[q][a:b] for q, a, b in self.plan.pieces(segs)]

    def divisors(self, segs: np.ndarray) -> np.ndarray:
        """The divisor of each of ``segs``' means: residues of its sequence (all its windows)."""
        return self.plan.residues[self.plan.sequence[segs]]

    def weights(self, segs: np.ndarray) -> np.ndarray | None:
        """Blending weights of the residues of ``segs``; None where none is windowed (all 1)."""
        return self.plan.weights(segs) if self.plan.blended(segs).any() else None


class BatchOutput(NamedTuple):
    """A batch's outputs on the host, as the blender takes them.

    Attributes
    ----------
    segs
        Segments of the batch, in the order of the outputs.
    pooled
        Their pooled contributions ``(len(segs), layers, dim)``, float32.
    rows
        Their residues' rows back to back (weighted for windowed sequences), or None.
    """

    segs: np.ndarray
    pooled: np.ndarray
    rows: np.ndarray | None


class Engine(ABC):
    """An engine: embeds lists of sequences with one model on one device.

    Subclasses set the attributes below in their constructor and implement ``_stage`` and
    ``_launch`` (and ``_collect`` where outputs come back asynchronously).

    Attributes
    ----------
    model
        A fair-esm ``ESM2`` module on :attr:`device`, in eval mode.
    layers
        Layers to pool, numbered as fair-esm numbers them (0 is the embedding, ``num_layers``
        the final layer, taken after the final layer norm).
    max_residues
        Residues per window (kept per sequence unless windowed).
    tokens_per_batch
        Token budget of one batch.
    device
        The model's device.
    compile_seconds
        Seconds spent compiling and warming up (0 for an engine that never compiles).
    """

    #: Count a batch's tokens as ``count * longest`` (padded) rather than their sum (packed).
    padded: ClassVar[bool]
    #: Batches left launched, not yet collected, while the next one is staged and launched.
    lookahead: ClassVar[int] = 0

    model: torch.nn.Module
    layers: list[int]
    max_residues: int
    tokens_per_batch: int
    device: torch.device
    compile_seconds: float = 0.0

    @property
    def compiles_by_default(self) -> bool:
        """Whether ``compile=None`` compiles this engine (never, unless an engine says so)."""
        return False

    def enable_compile(self) -> float:
        """Compile the engine if it can be, and return the seconds spent (here: nothing, 0)."""
        return 0.0

    def embed(
        self,
        sequences: list[bytes],
        on_batch: Callable[[int], None] | None = None,
        *,
        long: str = "truncate",
        on_residues: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
        residue_dtype: str = "float16",
    ) -> np.ndarray:
        """Return mean embeddings, float32 of shape ``(len(sequences), len(layers), dim)``.

        Rows are in the order of ``sequences``; batches run longest first.

        Parameters
        ----------
        sequences
            Validated sequences as bytes.
        on_batch
            Called with the tokens (residues + 2 per window) of each batch once its outputs
            are on the host.
        long
            ``"truncate"`` embeds the first ``max_residues`` residues of a longer sequence;
            ``"window"`` embeds all of them in overlapping windows
            (:mod:`virnuc_dask.plan.windows`), blended on the host.
        on_residues
            Called with per-residue values as whole sequences are done:
            ``(positions in sequences, rows (residues, layers, dim) in residue_dtype, counts)``.
            None: per-residue values are not computed.
        residue_dtype
            Dtype of the rows given to ``on_residues``.
        """
        out = np.zeros((len(sequences), len(self.layers), self.model.embed_dim), np.float32)
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        plan = plan_segments(lengths, self.max_residues, long)
        run = Run(sequences, plan, on_residues is not None, residue_dtype)
        blender = Blender(plan, out, on_residues, residue_dtype)
        sizes = plan.lengths
        order = np.argsort(-sizes, kind="stable")
        cuts = token_budget_batches(sizes[order] + 2, self.tokens_per_batch, padded=self.padded)
        batches = [order[cut] for cut in cuts]
        if not batches:
            return out

        def finish(pending: Any) -> None:
            segs, pooled, rows = self._collect(pending)
            blender.add(segs, pooled, rows)
            if on_batch is not None:
                on_batch(int(sizes[segs].sum()) + 2 * len(segs))

        in_flight: deque[Any] = deque()
        with torch.inference_mode(), self._on_device():
            staged = self._stage(run, batches[0])
            for upcoming in [*batches[1:], None]:
                in_flight.extend(self._launch(staged))
                # The device now has this batch queued: prepare the next one meanwhile, then
                # collect what the engine does not keep in flight.
                if upcoming is not None:
                    staged = self._stage(run, upcoming)
                while len(in_flight) > self.lookahead:
                    finish(in_flight.popleft())
            while in_flight:
                finish(in_flight.popleft())
        return out

    @abstractmethod
    def _stage(self, run: Run, segs: np.ndarray) -> Any:
        """Prepare the batch of segments ``segs`` of ``run``; return what ``_launch`` takes."""

    @abstractmethod
    def _launch(self, staged: Any) -> list[Any]:
        """Start computing a staged batch; return what ``_collect`` takes, one per batch run."""

    def _collect(self, pending: Any) -> BatchOutput:
        """Wait for a launched batch; return its outputs (here: already on the host)."""
        return pending

    def _on_device(self) -> AbstractContextManager:
        """A context under which a call's batches run (here: none)."""
        return nullcontext()
