"""Shared fixtures: FASTA writers, the tiny model, and real Dask clusters of worker processes."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY, two_worker_cluster
from virnuc_dask.model.checkpoint import resolve_weights
from virnuc_dask.model.loading import load_model


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny architecture with seed-0 random weights (fp32, CPU, eval)."""
    return load_model(resolve_weights(TINY, random_weights=True, seed=0))


@pytest.fixture(scope="module")
def cluster_client():
    """A real ``LocalCluster`` of two worker processes (one thread each) and its client."""
    with two_worker_cluster() as client:
        yield client
