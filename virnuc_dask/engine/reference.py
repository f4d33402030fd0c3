"""The reference engine: fair-esm's own forward on padded batches, pooled the same way.

This is the path every other engine is measured against, and the one CPU workers run: it
calls the unmodified ``ESM2.forward`` of fair-esm on length-sorted, padded, token-budget
batches and mean-pools the requested layers over residue positions (BOS, EOS and padding
excluded). It runs in the model's dtype (fp32 by default) on any device.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from virnuc_dask.engine.batching import token_budget_batches
from virnuc_dask.tokens import MODEL_WINDOW, padded_tokens


class ReferenceEngine:
    """Embed sequences with fair-esm's ``ESM2.forward`` on padded batches.

    Parameters
    ----------
    model
        A fair-esm ``ESM2`` module, already on ``device`` and in eval mode.
    layers
        Layers to pool, numbered as fair-esm numbers them (0 is the embedding, ``num_layers``
        the final layer, taken after the final layer norm).
    max_residues
        Residues kept per sequence (the model's window is 1022).
    tokens_per_batch
        Token budget of one padded batch (``count * longest``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        layers: list[int],
        max_residues: int = MODEL_WINDOW,
        tokens_per_batch: int = 16384,
    ) -> None:
        self.model = model
        self.layers = list(layers)
        self.max_residues = max_residues
        self.tokens_per_batch = tokens_per_batch
        self.device = next(model.parameters()).device

    def embed(
        self, sequences: list[bytes], on_batch: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Return mean embeddings, float32 of shape ``(len(sequences), len(layers), dim)``.

        ``on_batch`` is called with the tokens (residues + 2 per sequence) of each batch
        once it is done.
        """
        residues = np.array([min(len(s), self.max_residues) for s in sequences], dtype=np.int64)
        order = np.argsort(-residues, kind="stable")
        out = np.empty((len(sequences), len(self.layers), self.model.embed_dim), np.float32)
        batches = token_budget_batches(residues[order] + 2, self.tokens_per_batch, padded=True)
        with torch.inference_mode():
            for batch in batches:
                rows = order[batch]
                out[rows] = self._embed_batch([sequences[i] for i in rows], residues[rows])
                if on_batch is not None:
                    on_batch(int(residues[rows].sum()) + 2 * len(rows))
        return out

    def _embed_batch(self, sequences: list[bytes], residues: np.ndarray) -> np.ndarray:
        tokens = torch.from_numpy(padded_tokens(sequences, self.max_residues)).to(self.device)
        reps = self.model(tokens, repr_layers=self.layers)["representations"]
        positions = torch.arange(tokens.shape[1], device=self.device)
        lengths = torch.from_numpy(residues).to(self.device)
        # Residues sit at positions 1..L; BOS (0), EOS (L + 1) and padding are left out.
        mask = ((positions >= 1) & (positions <= lengths[:, None])).to(torch.float32)
        pooled = [
            (reps[layer].float() * mask[..., None]).sum(1) / lengths[:, None].float()
            for layer in self.layers
        ]
        return torch.stack(pooled, dim=1).cpu().numpy()
