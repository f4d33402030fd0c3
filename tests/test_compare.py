"""Row comparison: exact rows agree, a swapped pair is seen, shapes must match."""

import numpy as np
import pytest

from virnuc_dask.engine.fidelity import row_agreement


def test_identical_rows_agree_and_swapped_rows_do_not():
    rows = np.random.default_rng(0).normal(size=(5, 2, 8)).astype(np.float32)
    cosine, error = row_agreement(rows, rows)
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-12)
    assert error.max() == 0.0
    _, error = row_agreement(rows[[1, 0, 2, 3, 4]], rows)
    assert error[:2].min() > 0.5 and error[2:].max() == 0.0


def test_relative_error_is_against_the_reference_row():
    _, error = row_agreement(np.array([[3.0, 4.0]]), np.array([[0.0, 5.0]]))
    assert error[0] == pytest.approx(np.hypot(3, 1) / 5)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="shapes differ"):
        row_agreement(np.zeros((2, 3)), np.zeros((3, 3)))
