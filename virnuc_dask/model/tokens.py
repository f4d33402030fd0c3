"""Tokenisation: protein letters to fair-esm token ids, vectorised.

fair-esm's batch converter walks each sequence character by character in Python; with Dask
setting ``OMP_NUM_THREADS=1`` in workers that becomes the bottleneck of a GPU run. Here one
256-entry lookup table, built from fair-esm's own ``Alphabet``, maps a whole batch of bytes to
token ids in one numpy call. The ids are identical to the batch converter's for every valid
sequence (``tests/test_tokens.py`` checks this letter by letter).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

#: Letters fair-esm's ESM-1b/ESM-2 alphabet gives a token of its own (20 amino acids, the
#: ambiguity codes X B U Z O, and the gap symbols ``.`` and ``-``).
RESIDUE_LETTERS = b"LAGVSERTIDPKQNFYMHWCXBUZO.-"

#: Residues the model sees at most: ESM-2 was trained on 1024 positions including BOS and EOS.
MODEL_WINDOW = 1022


@lru_cache(maxsize=1)
def _alphabet():
    import esm

    return esm.data.Alphabet.from_architecture("ESM-1b")


@lru_cache(maxsize=1)
def lookup_table() -> np.ndarray:
    """Return the byte-to-token table: entry ``b`` is the token id of letter ``b``, or -1.

    Lower-case letters map to their upper-case token, as the index upper-cases sequences.
    """
    alphabet = _alphabet()
    table = np.full(256, -1, dtype=np.int64)
    for letter in RESIDUE_LETTERS:
        token = alphabet.tok_to_idx[chr(letter)]
        table[letter] = token
        table[ord(chr(letter).lower())] = token
    return table


def special_tokens() -> dict[str, int]:
    """Return fair-esm's ids of ``bos`` (``<cls>``), ``eos`` and ``pad``."""
    alphabet = _alphabet()
    return {"bos": alphabet.cls_idx, "eos": alphabet.eos_idx, "pad": alphabet.padding_idx}


def residue_tokens(sequences: list[bytes], max_residues: int = MODEL_WINDOW) -> list[np.ndarray]:
    """Tokenise sequences without BOS/EOS, truncated to ``max_residues``.

    Parameters
    ----------
    sequences
        Validated sequences as bytes (letters of :data:`RESIDUE_LETTERS`, any case).
    max_residues
        Residues kept per sequence; the rest is dropped (the caller flags truncation).

    Returns
    -------
    list of numpy.ndarray
        One int64 array of token ids per sequence.
    """
    table = lookup_table()
    joined = np.frombuffer(b"".join(s[:max_residues] for s in sequences), dtype=np.uint8)
    tokens = table[joined]
    if (tokens < 0).any():
        bad = int(np.flatnonzero(tokens < 0)[0])
        raise ValueError(
            f"byte {joined[bad]!r} is not a residue letter; validate before tokenising"
        )
    bounds = np.cumsum([min(len(s), max_residues) for s in sequences])[:-1]
    return np.split(tokens, bounds)


def packed_tokens(
    sequences: list[bytes], max_residues: int = MODEL_WINDOW
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise a batch into one padding-free stream with BOS and EOS around each sequence.

    Returns
    -------
    tokens : numpy.ndarray
        int64 ids of all sequences back to back, ``<cls> residues <eos>`` each.
    cu_seqlens : numpy.ndarray
        int32 cumulative offsets, length ``len(sequences) + 1``: sequence ``i`` occupies
        ``tokens[cu_seqlens[i]:cu_seqlens[i + 1]]``.
    """
    special = special_tokens()
    parts = residue_tokens(sequences, max_residues)
    lengths = np.array([len(p) + 2 for p in parts], dtype=np.int64)
    cu_seqlens = np.zeros(len(parts) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    tokens = np.empty(int(cu_seqlens[-1]), dtype=np.int64)
    starts = cu_seqlens[:-1]
    tokens[starts] = special["bos"]
    tokens[cu_seqlens[1:] - 1] = special["eos"]
    if parts:
        body = np.ones(len(tokens), dtype=bool)
        body[starts] = False
        body[cu_seqlens[1:] - 1] = False
        tokens[body] = np.concatenate(parts)
    return tokens, cu_seqlens


def padded_tokens(sequences: list[bytes], max_residues: int = MODEL_WINDOW) -> np.ndarray:
    """Tokenise a batch into fair-esm's padded ``(batch, longest + 2)`` layout.

    Identical to ``alphabet.get_batch_converter(max_residues)`` for valid upper-case input.
    """
    special = special_tokens()
    parts = residue_tokens(sequences, max_residues)
    width = max((len(p) for p in parts), default=0) + 2
    tokens = np.full((len(parts), width), special["pad"], dtype=np.int64)
    tokens[:, 0] = special["bos"]
    for row, part in enumerate(parts):
        tokens[row, 1 : len(part) + 1] = part
        tokens[row, len(part) + 1] = special["eos"]
    return tokens
