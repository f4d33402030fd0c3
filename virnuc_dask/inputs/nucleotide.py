"""Nucleotides: the letters a read may hold, and the rule that tells a nucleotide file apart.

Without a translation option, a FASTA file of DNA or RNA would be embedded as if ``A``, ``C``,
``G`` and ``T`` were amino acids (alanine, cysteine, glycine, threonine): every letter is in
ESM-2's alphabet, so nothing else would stop it. :func:`looks_like_nucleotides` decides, from
the letters of a file, that it holds nucleotides; the FASTA scan then refuses the file and
says to use ``--translate six-frame``.

The rule (``docs/input.md``), over the first :data:`SAMPLE_LETTERS` letters of the file:

- at least :data:`MIN_LETTERS` letters, and
- at least 90% of them are ``A``, ``C``, ``G``, ``T``, ``U`` or ``N`` (either case), and
- each of ``A``, ``C``, ``G`` and ``T``-or-``U`` is at least 5% of the letters.

The last condition is what keeps proteins safe. Sequences made mostly of alanine, glycine,
threonine and asparagine exist (poly-A and poly-G stretches, antifreeze proteins, collagen-like
and linker peptides), but cysteine is rare in proteins (about 1.4% of residues), so a protein
that is 90% A/C/G/T/N *and* at least 5% of each of A, C, G and T is far outside what proteins
are made of; DNA has all four bases even at extreme GC contents (13% GC still gives 6.5% each
of C and G).
"""

from __future__ import annotations

import numpy as np

#: IUPAC ambiguity codes a read may hold besides A, C, G, T and U (either case).
AMBIGUOUS = b"RYKMSWBDHVN"
#: Letters examined per file, from its start.
SAMPLE_LETTERS = 1 << 20
#: Fewer letters than this are never called nucleotides (``GATTACA`` is a fine peptide).
MIN_LETTERS = 20
#: Share of the letters that must be A, C, G, T, U or N.
MIN_NUCLEOTIDE_SHARE = 0.9
#: Share of the letters that each of A, C, G and T/U must reach.
MIN_BASE_SHARE = 0.05


def letter_counts(sample: bytes | bytearray) -> np.ndarray:
    """Counts of each byte value (256) in ``sample``."""
    return np.bincount(np.frombuffer(bytes(sample), dtype=np.uint8), minlength=256)


def looks_like_nucleotides(counts: np.ndarray) -> float | None:
    """Whether letter ``counts`` (256 byte counts) are those of DNA or RNA.

    Returns the share of A, C, G, T, U and N letters when the rule says nucleotides, else
    None.
    """
    upper = counts[65:91] + counts[97:123]  # A..Z, either case
    total = int(upper.sum())
    if total < MIN_LETTERS:
        return None

    def share(letters: bytes) -> float:
        return sum(int(upper[letter - 65]) for letter in letters) / total

    nucleotides = share(b"ACGTUN")
    bases = (share(b"A"), share(b"C"), share(b"G"), share(b"TU"))
    if nucleotides >= MIN_NUCLEOTIDE_SHARE and min(bases) >= MIN_BASE_SHARE:
        return nucleotides
    return None
