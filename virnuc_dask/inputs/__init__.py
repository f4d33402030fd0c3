"""The input side: from the user's files to an index of sequences that workers read back.

One module per step: :mod:`~virnuc_dask.inputs.staging` (check the paths, recognise
compression, stage what cannot seek), :mod:`~virnuc_dask.inputs.fasta` (the protein FASTA scan
and :class:`~virnuc_dask.inputs.fasta.FastaIndex`), :mod:`~virnuc_dask.inputs.duplicates`
(ids seen twice) and :mod:`~virnuc_dask.inputs.nucleotide` (telling DNA and RNA apart).
"""
