"""Dask preload module: a local cluster's worker starts loading the run's model as it starts.

:func:`virnuc_dask.cluster.connect` names this module in the workers' ``preload`` list, with
the run's engine settings as its argument, when the run starts its own cluster. Loading then
overlaps the worker's registration and the driver's connection instead of following them; the
run's :class:`~virnuc_dask.worker.ModelPlugin` picks up the result.
"""

from __future__ import annotations

import click


@click.command()
@click.argument("settings")
def dask_setup(worker, settings: str) -> None:
    """Start loading the engine of ``settings`` (JSON of ``EngineSettings``) in the background."""
    from virnuc_dask.worker import EngineSettings, start_loading

    start_loading(EngineSettings.from_json(settings))
