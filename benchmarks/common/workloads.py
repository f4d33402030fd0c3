"""The job benchmarks' peptide sets, drawn once from a seed and cut.

Decisions:

- ``viral`` = 120,000 random peptides of 50-170 residues, uniform lengths (13.4 M tokens,
  tokens = residues + 2); ``small`` = its first 100. The whole set is always drawn and then
  cut, so ``small``, the smoke stand-in (the first 3,000) and the engine's own measurement are
  exactly the first sequences of the full set, whichever benchmark draws them.
- Inputs are written once per work folder and reused, through a temporary name, so that a
  killed setup never leaves a half file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORKLOADS = ["small", "viral"]
VIRAL_SEQUENCES = 120_000
SMOKE_VIRAL_SEQUENCES = 3_000
SMALL_SEQUENCES = 100
LENGTHS = (50, 170)  # residues, both ends included
MODEL_WINDOW = 1022
AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)


def peptides(count: int, seed: int) -> list[bytes]:
    """The first ``count`` of the ``viral`` set: random residues, lengths uniform in 50-170.

    Parameters
    ----------
    count
        How many of the set's peptides, from its start.
    seed
        The set's seed.

    Returns
    -------
    list of bytes
        One-letter residues per peptide.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(LENGTHS[0], LENGTHS[1] + 1, VIRAL_SEQUENCES)
    residues = AMINO[rng.integers(0, len(AMINO), int(lengths.sum()))]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return [residues[starts[i] : starts[i + 1]].tobytes() for i in range(count)]


def tokens_of(sequences: list[bytes]) -> int:
    """Tokens the models see: residues (cut to the model's window) plus BOS and EOS."""
    return sum(min(len(s), MODEL_WINDOW) + 2 for s in sequences)


def write_inputs(work: Path, counts: dict[str, int], seed: int) -> dict[str, dict]:
    """Write one FASTA file per workload (reused when present); return their paths and sizes.

    Parameters
    ----------
    work
        The folder the files go to, named ``NAME-COUNT-seedSEED.fasta``.
    counts
        Workload name to its number of peptides.
    seed
        The set's seed.

    Returns
    -------
    dict
        Workload name to ``{"path", "sequences", "tokens"}``.
    """
    every = peptides(max(counts.values()), seed)
    inputs = {}
    for name, count in counts.items():
        path = work / f"{name}-{count}-seed{seed}.fasta"
        sequences = every[:count]
        if not path.exists():
            partial = path.with_suffix(".partial")
            partial.write_bytes(b"".join(b">p%d\n%s\n" % (i, s) for i, s in enumerate(sequences)))
            partial.replace(path)
        inputs[name] = {"path": path, "sequences": count, "tokens": tokens_of(sequences)}
    return inputs
