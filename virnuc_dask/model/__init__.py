"""The model side: which ESM-2 models exist, where their weights are, and loading them.

:mod:`~virnuc_dask.model.registry` (names and shapes), :mod:`~virnuc_dask.model.weights`
(where weights come from, checkpoint digests), :mod:`~virnuc_dask.model.checkpoint` (safe
reading and checking of fair-esm files, with :mod:`~virnuc_dask.model.checkpoint_layout` for
the driver's torch-free check), :mod:`~virnuc_dask.model.loading` (the module on a device) and
:mod:`~virnuc_dask.model.tokens` (fair-esm's alphabet as numpy lookups).
"""
