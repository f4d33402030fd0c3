"""Token-budget batches: how many sequences go through the model at once.

A batch is bounded by tokens, not by a count of sequences, so that a batch of 60-residue
peptides and a batch of 1,000-residue proteins cost the device about the same memory and time.
"""

from __future__ import annotations

import numpy as np


def token_budget_batches(tokens: np.ndarray, budget: int, *, padded: bool) -> list[np.ndarray]:
    """Cut sequences, in the order given, into consecutive batches within a token budget.

    Parameters
    ----------
    tokens
        Tokens per sequence (residues after truncation, plus BOS and EOS).
    budget
        Tokens a batch may hold. A sequence larger than the budget gets a batch of its own.
    padded
        Count a batch as ``count * longest`` (a padded batch) rather than the sum of its
        sequences (a packed, padding-free batch).

    Returns
    -------
    list of numpy.ndarray
        Positions into ``tokens``, one array per batch, covering every sequence once.
    """
    if budget < 1:
        raise ValueError(f"token budget must be positive, got {budget}")
    batches: list[np.ndarray] = []
    start, used, longest = 0, 0, 0
    for i, t in enumerate(np.asarray(tokens, dtype=np.int64).tolist()):
        longest_if = max(longest, t)
        cost = (i - start + 1) * longest_if if padded else used + t
        if i > start and cost > budget:
            batches.append(np.arange(start, i))
            start, used, longest_if = i, 0, t
        used += t
        longest = longest_if
    if start < len(tokens):
        batches.append(np.arange(start, len(tokens)))
    return batches
