"""The Dask side of the workers: which cluster, the model resident on each worker, one task per
chunk.

:mod:`~virnuc_dask.cluster.hardware` (what the machine has: GPUs, usable cores),
:mod:`~virnuc_dask.cluster.local` (a local cluster that fits it),
:mod:`~virnuc_dask.cluster.existing` (an existing scheduler, or a local cluster: the client a
run uses), :mod:`~virnuc_dask.cluster.plugin` (the resident engine of each worker),
:mod:`~virnuc_dask.cluster.task` (the chunk task) with :mod:`~virnuc_dask.cluster.watchdog`
(its time limit) and :mod:`~virnuc_dask.cluster.events` (its batch reports to the driver).
torch is imported only inside the functions that run on a worker.
"""
