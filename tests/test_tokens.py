"""Tokens must equal fair-esm's batch converter for every valid sequence."""

import numpy as np
import pytest

from tests.helpers import random_sequences
from virnuc_dask.model.tokens import RESIDUE_LETTERS, packed_tokens, padded_tokens, residue_tokens


@pytest.fixture(scope="module")
def converter():
    import esm

    return esm.data.Alphabet.from_architecture("ESM-1b").get_batch_converter(1022)


def test_every_letter_matches_fair_esm(converter):
    letters = RESIDUE_LETTERS.decode()
    _, _, expected = converter([("all", letters)])
    assert np.array_equal(padded_tokens([letters.encode()]), expected.numpy())


def test_padded_batch_matches_fair_esm_with_truncation(converter):
    seqs = random_sequences(20, 1, 1500, seed=1) + ["XBUZO.-" * 3]
    _, _, expected = converter([(str(i), s) for i, s in enumerate(seqs)])
    assert np.array_equal(padded_tokens([s.encode() for s in seqs]), expected.numpy())


def test_lower_case_tokenises_as_upper_case():
    assert np.array_equal(residue_tokens([b"mkvl"])[0], residue_tokens([b"MKVL"])[0])


def test_packed_stream_is_the_padded_rows_without_padding(converter):
    seqs = random_sequences(7, 1, 40, seed=2)
    tokens, cu = packed_tokens([s.encode() for s in seqs])
    _, _, padded = converter([(str(i), s) for i, s in enumerate(seqs)])
    assert cu[0] == 0 and cu[-1] == len(tokens)
    for i, seq in enumerate(seqs):
        assert np.array_equal(tokens[cu[i] : cu[i + 1]], padded[i, : len(seq) + 2].numpy())


def test_invalid_byte_is_refused():
    with pytest.raises(ValueError, match="not a residue letter"):
        residue_tokens([b"MKJ"])
