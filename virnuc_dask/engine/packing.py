"""Packed batches: sequences back to back in one token stream, and the mean over each.

A batch's sequences are concatenated into one token stream described by ``cu_seqlens`` (the
offsets where each sequence starts), so no compute is spent on padding: on viral peptides of
60-170 residues a padded batch wastes up to a third of its tokens, and on proteomes more.
Decisions:

- Each token carries its position within its own sequence (rotary positions restart at every
  sequence) and the output row it adds to; BOS and EOS point one row past the last sequence,
  a row that is dropped, so pooling is one ``index_add_`` with no mask.
- Pooling (mean over residues, BOS and EOS excluded) happens on the device in fp32
  (:func:`segment_mean`): only pooled vectors need to come back to the host.
- The windows of a long sequence are ordinary segments: their tokens carry blending weights,
  and a batch without windows multiplies by nothing, so it computes exactly what it did
  before windows existed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from virnuc_dask.model.tokens import MODEL_WINDOW, packed_tokens


@dataclass
class PackedBatch:
    """One batch tokenised into a packed stream, as host arrays (int32).

    Attributes
    ----------
    tokens
        Token ids of all sequences back to back, ``<cls> residues <eos>`` each.
    positions
        Position of each token within its own sequence (0 at its BOS).
    segments
        Row of the pooled output each token adds to: its sequence for a residue, one row past
        the last sequence for BOS and EOS (that row is dropped).
    cu_seqlens
        Offsets where each sequence starts, and the total at the end.
    residues
        Residues per sequence after truncation.
    max_len
        Tokens of the longest sequence.
    """

    tokens: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    cu_seqlens: np.ndarray
    residues: np.ndarray
    max_len: int

    def arrays(self) -> list[np.ndarray]:
        """The arrays in the order they travel to the device in one buffer."""
        return [self.tokens, self.positions, self.segments, self.cu_seqlens, self.residues]


def pack_batch(sequences: list[bytes], max_residues: int = MODEL_WINDOW) -> PackedBatch:
    """Tokenise sequences into one packed stream with per-token positions and segments.

    Parameters
    ----------
    sequences
        Validated sequences as bytes.
    max_residues
        Residues kept per sequence.

    Returns
    -------
    PackedBatch
    """
    tokens, cu_seqlens = packed_tokens(sequences, max_residues)
    count = len(sequences)
    lengths = np.diff(cu_seqlens)
    starts = np.repeat(cu_seqlens[:-1], lengths)
    positions = np.arange(len(tokens), dtype=np.int32) - starts
    segments = np.repeat(np.arange(count, dtype=np.int32), lengths)
    segments[cu_seqlens[:-1]] = count
    segments[cu_seqlens[1:] - 1] = count
    return PackedBatch(
        tokens=tokens.astype(np.int32),
        positions=positions.astype(np.int32),
        segments=segments,
        cu_seqlens=cu_seqlens,
        residues=(lengths - 2).astype(np.int32),
        max_len=int(lengths.max(initial=0)),
    )


def segment_mean(
    x: torch.Tensor,
    segments: torch.Tensor,
    residues: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the rows of ``x`` per segment, in fp32; segment ``len(residues)`` is dropped.

    Parameters
    ----------
    x
        Packed hidden states ``(tokens, dim)``.
    segments
        Output row of each token (BOS and EOS point one past the last row).
    residues
        The divisor of each row: residues of its sequence (of all its windows).
    weights
        Blending weight of each token (windows of long sequences); None: all 1, and nothing
        is multiplied, so a batch without windows computes exactly what it always did.
    """
    sums = torch.zeros(len(residues) + 1, x.shape[1], dtype=torch.float32, device=x.device)
    rows = x.float() if weights is None else x.float() * weights[:, None]
    sums.index_add_(0, segments, rows)
    return sums[:-1] / residues[:, None].float()
