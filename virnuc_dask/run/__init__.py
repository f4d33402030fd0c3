"""A run, from the call to the file: prepare on the driver, the graph, its execution.

:mod:`~virnuc_dask.run.prepare` (settings, paths, weights, inputs and partition checked and
made before anything computes), :mod:`~virnuc_dask.run.job` (the prepared run),
:mod:`~virnuc_dask.run.graph` (its Dask graph), :mod:`~virnuc_dask.run.execute` (the graph
computed, the output built as chunks finish), :mod:`~virnuc_dask.run.embed` (the one call that
also finds or starts a cluster), :mod:`~virnuc_dask.run.workdir` (what a resumed run reuses),
:mod:`~virnuc_dask.run.progress` and :mod:`~virnuc_dask.run.report` (what the user sees),
:mod:`~virnuc_dask.run.messages` and :mod:`~virnuc_dask.run.guards` (errors said plainly).
No torch here: the workers' side is :mod:`virnuc_dask.cluster`.
"""
