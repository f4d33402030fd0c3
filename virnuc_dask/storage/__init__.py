"""Where the run's files live: local paths and fsspec URLs, locks, ownership, the run's paths.

No Dask and no torch here. :mod:`~virnuc_dask.storage.urls` (what a URL is, the fsspec
options), :mod:`~virnuc_dask.storage.remote` (a file or folder at a URL), with
:mod:`~virnuc_dask.storage.reading` (byte ranges of remote files);
:mod:`~virnuc_dask.storage.locks` (one run per output), :mod:`~virnuc_dask.storage.ownership`
(the tool removes only what it made) and :mod:`~virnuc_dask.storage.paths` (the run's paths,
checked before any work).
"""
