"""Compare two sets of embeddings row by row: the measure of every fidelity check.

Random-weight ESM-2 embeddings of *different* sequences reach cosine 0.991 with each other, so
a cosine alone cannot tell a misaligned row; the relative error (norm of the difference over
the norm of the reference row) can, and both are reported.
"""

from __future__ import annotations

import numpy as np


def row_agreement(actual: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row cosine similarity and relative error of ``actual`` against ``expected``.

    Parameters
    ----------
    actual, expected
        Arrays of the same shape, one row per sequence (any trailing dimensions are flattened).

    Returns
    -------
    cosine, relative_error : numpy.ndarray
        float64, one value per row; the error is ``|actual - expected| / |expected|``.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {actual.shape} and {expected.shape}")
    a = actual.reshape(len(actual), -1).astype(np.float64)
    b = expected.reshape(len(expected), -1).astype(np.float64)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cosine = (a * b).sum(1) / (norm_a * norm_b)
    return cosine, np.linalg.norm(a - b, axis=1) / norm_b
