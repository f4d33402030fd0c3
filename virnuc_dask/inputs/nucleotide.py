"""Nucleotides: the letters a read may hold, and the rule that tells a nucleotide file apart.

Without a translation option, a FASTA file of DNA or RNA would be embedded as if its letters
were amino acids: every letter of the nucleotide alphabet (``A``, ``C``, ``G``, ``T``, ``U``
and the IUPAC codes ``R``, ``Y``, ``K``, ``M``, ``S``, ``W``, ``B``, ``D``, ``H``, ``V``,
``N``) is in ESM-2's alphabet too, so nothing else would stop it. :func:`looks_like_nucleotides`
decides, from the letters of a file, that it holds nucleotides; the FASTA scan then refuses
the file, says to use ``--translate six-frame``, and names the one way round the rule,
``--as-protein``, for a protein made only of these letters. The same alphabet read in reverse,
:func:`looks_like_protein`, tells a reads file given with ``--translate`` that is a protein
file, to say so in one line rather than at its first letter that is not a nucleotide.

The rule (``docs/input.md``), over the first :data:`SAMPLE_LETTERS` letters of the file, ``N``
and ``X`` set aside:

- at least :data:`MIN_LETTERS` letters, and
- at least 90% of them are nucleotide codes (the bases and the IUPAC codes), and
- at least 75% of them are bases, ``A``, ``C``, ``G``, ``T`` or ``U``, and
- each of ``A``, ``C``, ``G`` and ``T``-or-``U`` is at least 5% of them.

Why each part:

- ``N`` and ``X`` are set aside because they tell nothing: ``N`` is any base and asparagine,
  ``X`` any residue and the mask of masked DNA. Counted, a scaffold of long ``N`` runs (85%
  ``N``) has each base at 3.75% of its letters, and was embedded as a protein; set aside, its
  remaining letters are plain DNA. They are also left out of the sample, so a file that starts
  with a long gap is still judged by its bases.
- The IUPAC codes count as nucleotide letters, so a consensus with ambiguity codes (15% ``R``,
  ``Y``, ``K``, ``M``, ``S``, ``W``) is DNA. Up to 10% of other letters are tolerated (a few
  stray letters do not make DNA a protein).
- Bases must be three quarters of the letters: ambiguity codes are a minority of any real
  consensus, while ``S``, ``K``, ``R``, ``D``, ``H``, ``M``, ``W``, ``Y`` and ``V`` are common
  amino acids. Without this part a cysteine-rich protein such as a metallothionein (a third
  C, 15% S, 13% K, a tenth A, 7% G, 3% T: 90% of its letters nucleotide codes) would be one
  threonine away from refusal; its bases are 53% of its letters, 68% with every serine made
  a threonine.
- Every base at 5%: cysteine is rare in proteins (about 1.4% of residues), and proteins made
  mostly of alanine, glycine, threonine and asparagine (poly-A and poly-G stretches, antifreeze
  proteins, collagen-like, silk and linker peptides) lack at least one of the four; DNA has all
  four even at extreme GC contents (13% GC still gives 6.5% each of C and G).

In reverse (:func:`looks_like_protein`): more than 10% of the letters (``N`` and ``X`` set aside)
are not nucleotide codes, the very letters a reads file cannot hold. It only words the
refusal of a reads file that fails anyway, so it can never refuse a reads file that translates.
"""

from __future__ import annotations

import numpy as np

#: The bases, in upper case (lower case reads the same).
BASES = b"ACGTU"
#: IUPAC ambiguity codes a read may hold besides the bases (either case).
AMBIGUOUS = b"RYKMSWBDHVN"
#: Letters set aside by the rule: ``N`` (any base, and asparagine), ``X`` (any residue, and the
#: mask of masked DNA).
UNKNOWN = b"NX"
#: Letters examined per file, from its start (``N`` and ``X`` not counted).
SAMPLE_LETTERS = 1 << 20
#: Fewer letters than this are never called nucleotides (``GATTACA`` is a fine peptide).
MIN_LETTERS = 20
#: Share of the letters that must be nucleotide codes (bases or IUPAC codes).
MIN_CODE_SHARE = 0.9
#: Share of the letters that must be bases (A, C, G, T, U).
MIN_BASES_SHARE = 0.75
#: Share of the letters that each of A, C, G and T/U must reach.
MIN_BASE_SHARE = 0.05

_CODES = set(BASES + AMBIGUOUS)
_SET_ASIDE = UNKNOWN + UNKNOWN.lower()


def sample_letters(letters: bytes) -> bytes:
    """The letters of ``letters`` that count towards a file's sample (``N`` and ``X`` dropped)."""
    return letters.translate(None, _SET_ASIDE)


def letter_counts(sample: bytes | bytearray | np.ndarray) -> np.ndarray:
    """Counts of each byte value (256) in ``sample`` (bytes, or a uint8 array)."""
    if not isinstance(sample, np.ndarray):
        sample = np.frombuffer(bytes(sample), dtype=np.uint8)
    return np.bincount(sample, minlength=256)


def _letters(counts: np.ndarray) -> tuple[np.ndarray, int]:
    """Counts of ``A`` .. ``Z`` (either case), ``N`` and ``X`` zeroed, and their total."""
    upper = counts[65:91] + counts[97:123]
    for letter in UNKNOWN:
        upper[letter - 65] = 0
    return upper, int(upper.sum())


def looks_like_nucleotides(counts: np.ndarray) -> float | None:
    """Whether letter ``counts`` (256 byte counts) are those of DNA or RNA.

    Parameters
    ----------
    counts
        Counts of each byte value in a file's sample (:func:`letter_counts`).

    Returns
    -------
    float or None
        The share of nucleotide codes among the letters other than ``N`` and ``X`` when the
        rule says nucleotides, else None.
    """
    upper, total = _letters(counts)
    if total < MIN_LETTERS:
        return None

    def share(letters: bytes) -> float:
        return sum(int(upper[letter - 65]) for letter in letters) / total

    codes = share(bytes(_CODES))
    each = (share(b"A"), share(b"C"), share(b"G"), share(b"TU"))
    if codes >= MIN_CODE_SHARE and sum(each) >= MIN_BASES_SHARE and min(each) >= MIN_BASE_SHARE:
        return codes
    return None


def looks_like_protein(counts: np.ndarray) -> tuple[float, bytes] | None:
    """Whether letter ``counts`` are those of proteins: the rule's alphabet read in reverse.

    Parameters
    ----------
    counts
        Counts of each byte value in a file's letters (:func:`letter_counts`).

    Returns
    -------
    tuple or None
        When more than ``1 - MIN_CODE_SHARE`` of the letters (``N`` and ``X`` set aside) are
        not nucleotide codes: that share, and those letters, most frequent first (at most
        three). Else None.
    """
    upper, total = _letters(counts)
    if total < MIN_LETTERS:
        return None
    others = {chr(65 + i): int(n) for i, n in enumerate(upper) if n and 65 + i not in _CODES}
    share = sum(others.values()) / total
    if share <= 1 - MIN_CODE_SHARE:
        return None
    common = sorted(others, key=lambda letter: (-others[letter], letter))[:3]
    return share, "".join(common).encode()
