"""The reference engine: fair-esm's own forward on padded batches, pooled the same way.

This is the path every other engine is measured against, and the one CPU workers run: it
calls the unmodified ``ESM2.forward`` of fair-esm on length-sorted, padded, token-budget
batches and mean-pools the requested layers over residue positions (BOS, EOS and padding
excluded). It runs in the model's dtype (fp32 by default) on any device.

Per-residue values are the same representations at positions 1..n, handed on per batch; with
``long="window"`` each window of a long sequence is one padded row like any sequence, and the
windows are blended on the host (:class:`~virnuc_dask.engine.blend.Blender`).

The loop over batches is the engine base's (:class:`~virnuc_dask.engine.base.Engine`); this
engine keeps no batch in flight: each one is computed, blended and reported before the next.
"""

from __future__ import annotations

import numpy as np
import torch

from virnuc_dask.engine.base import BatchOutput, Engine, Run
from virnuc_dask.model.tokens import MODEL_WINDOW, padded_tokens


class ReferenceEngine(Engine):
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

    padded = True
    lookahead = 0

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

    def _stage(self, run: Run, segs: np.ndarray) -> tuple[Run, np.ndarray]:
        # Nothing to prepare ahead: each batch runs whole in _launch, before the next one.
        return run, segs

    def _launch(self, staged: tuple[Run, np.ndarray]) -> list[BatchOutput]:
        run, segs = staged
        pooled, rows = self._embed_batch(
            run.pieces(segs),
            run.plan.lengths[segs],
            run.divisors(segs),
            run.weights(segs),
            run.residues,
        )
        return [BatchOutput(segs, pooled, rows)]

    def _embed_batch(
        self,
        pieces: list[bytes],
        sizes: np.ndarray,
        divisors: np.ndarray,
        weights: np.ndarray | None,
        rows: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Pooled contributions of a padded batch of segments, and their residues' rows.

        ``divisors`` are the residues of each segment's sequence; ``weights`` the blending
        weights of all their residues back to back (None: all 1, nothing is multiplied).
        """
        tokens = torch.from_numpy(padded_tokens(pieces, self.max_residues)).to(self.device)
        reps = self.model(tokens, repr_layers=self.layers)["representations"]
        positions = torch.arange(tokens.shape[1], device=self.device)
        counts = torch.from_numpy(sizes).to(self.device)
        # Residues sit at positions 1..n; BOS (0), EOS (n + 1) and padding are left out.
        body = (positions >= 1) & (positions <= counts[:, None])
        mask = body.to(torch.float32)
        if weights is not None:
            mask[body] = torch.from_numpy(weights).to(self.device)
        divisor = torch.from_numpy(divisors).to(self.device).float()
        pooled = [
            (reps[layer].float() * mask[..., None]).sum(1) / divisor[:, None]
            for layer in self.layers
        ]
        pooled = torch.stack(pooled, dim=1).cpu().numpy()
        if not rows:
            return pooled, None
        # Row-major boolean indexing keeps segment order, then position order.
        values = torch.stack([reps[layer] for layer in self.layers], dim=2)[body].float()
        if weights is not None:
            values = values * mask[body][:, None, None]
        return pooled, values.cpu().numpy()
