"""The reference engine equals fair-esm's own forward, pooled the same way, to 1e-5."""

import numpy as np

from tests.helpers import assert_rows_close, fair_esm_embeddings, random_sequences
from virnuc_dask.engine.reference import ReferenceEngine

LENGTHS = [1, 2, 3, 7, 30, 100, 257, 500, 1000, 1021, 1022, 1023, 1200, 1500]


def test_matches_fair_esm_across_lengths_and_layers(tiny_model):
    seqs = [random_sequences(1, n, n, seed=n)[0] for n in LENGTHS]
    seqs += random_sequences(30, 1, 400, seed=3)
    layers = [0, 1, 2]
    engine = ReferenceEngine(tiny_model, layers=layers, tokens_per_batch=4096)
    actual = engine.embed([s.encode() for s in seqs])
    expected = fair_esm_embeddings(tiny_model, seqs, layers)
    assert actual.shape == (len(seqs), 3, 64) and actual.dtype == np.float32
    assert_rows_close(actual, expected, rtol=1e-5)


def test_rows_keep_input_order_over_many_batches(tiny_model):
    seqs = random_sequences(60, 5, 200, seed=4)
    engine = ReferenceEngine(tiny_model, layers=[2], tokens_per_batch=300)
    actual = engine.embed([s.encode() for s in seqs])
    assert_rows_close(actual, fair_esm_embeddings(tiny_model, seqs, [2]))


def test_truncation_uses_the_first_1022_residues(tiny_model):
    seq = random_sequences(1, 1400, 1400, seed=9)[0]
    engine = ReferenceEngine(tiny_model, layers=[2])
    full, cut = engine.embed([seq.encode(), seq[:1022].encode()])
    np.testing.assert_array_equal(full, cut)
