"""The input side: from the user's files to an index of sequences that workers read back.

One module per step. Proteins: :mod:`~virnuc_dask.inputs.staging` (check the paths, recognise
compression, stage what cannot seek), :mod:`~virnuc_dask.inputs.fasta` (the FASTA scan and
:class:`~virnuc_dask.inputs.fasta.FastaIndex`), :mod:`~virnuc_dask.inputs.duplicates` (ids
seen twice) and :mod:`~virnuc_dask.inputs.nucleotide` (telling DNA and RNA apart, to refuse
them as proteins). Reads (``translate="six-frame"``): :mod:`~virnuc_dask.inputs.reads`
(blocks of whole records, as :mod:`~virnuc_dask.inputs.fastq` and
:mod:`~virnuc_dask.inputs.fasta_reads` parse them), :mod:`~virnuc_dask.inputs.split` (long
reads into pieces), :mod:`~virnuc_dask.inputs.genetic_codes` and
:mod:`~virnuc_dask.inputs.translate` (six frames, vectorised),
:mod:`~virnuc_dask.inputs.peptides` (the peptides' index) and
:mod:`~virnuc_dask.inputs.provenance` (each peptide's read, frame and bases, for the output).

:func:`index_inputs` is the one entry point of a run: proteins or reads, it returns the same
kind of index. :class:`FastaIndex`, :func:`build_index` and :func:`read_sequences` (the
FASTA index, and reading its sequences back) are exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from virnuc_dask.inputs.fasta import FastaIndex, build_index
from virnuc_dask.inputs.sequences import read_sequences

if TYPE_CHECKING:
    from virnuc_dask.config import EmbedConfig
    from virnuc_dask.inputs.provenance import ReadProvenance
    from virnuc_dask.storage.urls import StorageOptions


def index_inputs(
    inputs: list[str | Path],
    staging: str | Path,
    config: EmbedConfig,
    storage: StorageOptions | None = None,
) -> tuple[FastaIndex, ReadProvenance | None]:
    """Index a run's inputs: protein FASTA, or reads translated as ``config`` says.

    Parameters
    ----------
    inputs
        The input files.
    staging
        Folder for staged copies (gzip or piped proteins) and staged peptides (reads).
    config
        The run's settings (``translate``, ``invalid_to_x``, ``duplicate_ids``, ...).
    storage
        fsspec options for inputs given as URLs.

    Returns
    -------
    index, provenance
        The sequences to embed, and for reads where each peptide comes from (else None).
    """
    from virnuc_dask.inputs.fasta import build_index
    from virnuc_dask.inputs.peptides import build_peptide_index

    translation = config.translation()
    if translation is not None:
        return build_peptide_index(
            inputs, staging, translation, duplicate_ids=config.duplicate_ids, storage=storage
        )
    index = build_index(
        inputs,
        staging,
        invalid_to_x=config.invalid_to_x,
        duplicate_ids=config.duplicate_ids,
        storage=storage,
        as_protein=config.as_protein,
    )
    return index, None


__all__ = ["FastaIndex", "build_index", "index_inputs", "read_sequences"]
