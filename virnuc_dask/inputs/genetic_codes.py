"""Genetic codes: NCBI's translation tables, by number, as 64-letter strings.

Each table is NCBI's ``AAs`` line (https://www.ncbi.nlm.nih.gov/Taxonomy/Utils/wprintgc.cgi):
the amino acid of every codon, codons in the order ``TTT, TTC, TTA, TTG, TCT, ...`` (bases in
the order T, C, A, G), ``*`` for a stop.

Tables 27, 28 and 31 are not offered: in them ``TAA``, ``TAG`` or ``TGA`` are a stop or an
amino acid depending on their place in the gene, which a six-frame scan of reads cannot tell.
Translating them one way or the other would silently guess.
"""

from __future__ import annotations

from virnuc_dask.errors import VirnucError

#: The order of bases in NCBI's tables.
NCBI_BASES = "TCAG"

#: NCBI translation tables: number -> (name, amino acids of the 64 codons).
TABLES: dict[int, tuple[str, str]] = {
    1: ("Standard", "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"),
    2: (
        "Vertebrate Mitochondrial",
        "FFLLSSSSYY**CCWWLLLLPPPPHHQQRRRRIIMMTTTTNNKKSS**VVVVAAAADDEEGGGG",
    ),
    3: ("Yeast Mitochondrial", "FFLLSSSSYY**CCWWTTTTPPPPHHQQRRRRIIMMTTTTNNKKSSRRVVVVAAAADDEEGGGG"),
    4: (
        "Mold, Protozoan, Coelenterate Mitochondrial and Mycoplasma/Spiroplasma",
        "FFLLSSSSYY**CCWWLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG",
    ),
    5: (
        "Invertebrate Mitochondrial",
        "FFLLSSSSYY**CCWWLLLLPPPPHHQQRRRRIIMMTTTTNNKKSSSSVVVVAAAADDEEGGGG",
    ),
    6: (
        "Ciliate, Dasycladacean and Hexamita Nuclear",
        "FFLLSSSSYYQQCC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG",
    ),
    9: (
        "Echinoderm and Flatworm Mitochondrial",
        "FFLLSSSSYY**CCWWLLLLPPPPHHQQRRRRIIIMTTTTNNNKSSSSVVVVAAAADDEEGGGG",
    ),
    10: ("Euplotid Nuclear", "FFLLSSSSYY**CCCWLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"),
    11: (
        "Bacterial, Archaeal and Plant Plastid",
        "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG",
    ),
    12: (
        "Alternative Yeast Nuclear",
        "FFLLSSSSYY**CC*WLLLSPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG",
    ),
    13: (
        "Ascidian Mitochondrial",
        "FFLLSSSSYY**CCWWLLLLPPPPHHQQRRRRIIMMTTTTNNKKSSGGVVVVAAAADDEEGGGG",
    ),
    14: (
        "Alternative Flatworm Mitochondrial",
        "FFLLSSSSYYY*CCWWLLLLPPPPHHQQRRRRIIIMTTTTNNNKSSSSVVVVAAAADDEEGGGG",
    ),
    15: ("Blepharisma Nuclear", "FFLLSSSSYY*QCC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"),
    16: (
        "Chlorophycean Mitochondrial",
        "FFLLSSSSYY*LCC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG",
    ),
    21: (
        "Trematode Mitochondrial",
        "FFLLSSSSYY**CCWWLLLLPPPPHHQQRRRRIIMMTTTTNNNKSSSSVVVVAAAADDEEGGGG",
    ),
    22: (
        "Scenedesmus obliquus Mitochondrial",
        "FFLLSS*SYY*LCC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG",
    ),
    23: (
        "Thraustochytrium Mitochondrial",
        "FF*LSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG",
    ),
    24: (
        "Rhabdopleuridae Mitochondrial",
        "FFLLSSSSYY**CCWWLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSSKVVVVAAAADDEEGGGG",
    ),
    25: (
        "Candidate Division SR1 and Gracilibacteria",
        "FFLLSSSSYY**CCGWLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG",
    ),
    26: (
        "Pachysolen tannophilus Nuclear",
        "FFLLSSSSYY**CC*WLLLAPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG",
    ),
    29: ("Mesodinium Nuclear", "FFLLSSSSYYYYCC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"),
    30: ("Peritrich Nuclear", "FFLLSSSSYYEECC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"),
    32: (
        "Balanophoraceae Plastid",
        "FFLLSSSSYY*WCC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG",
    ),
    33: (
        "Cephalodiscidae Mitochondrial",
        "FFLLSSSSYYY*CCWWLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSSKVVVVAAAADDEEGGGG",
    ),
}

#: Tables refused, and why.
CONTEXT_DEPENDENT = (27, 28, 31)


def codon_table(number: int) -> dict[str, str]:
    """NCBI table ``number`` as a mapping from each of the 64 codons (``"ATG"``) to its letter.

    Raises
    ------
    VirnucError
        For a number that is not an NCBI table offered here.
    """
    if number in CONTEXT_DEPENDENT:
        raise VirnucError(
            f"genetic code {number} is not offered: its stop codons also code for amino acids "
            "depending on their place in a gene, which a six-frame scan of reads cannot tell; "
            f"choose one of {_offered()}"
        )
    if number not in TABLES:
        raise VirnucError(f"genetic code {number} is not an NCBI table; choose one of {_offered()}")
    letters = TABLES[number][1]
    codons = [a + b + c for a in NCBI_BASES for b in NCBI_BASES for c in NCBI_BASES]
    return dict(zip(codons, letters, strict=True))


def _offered() -> str:
    return ", ".join(str(n) for n in TABLES)
