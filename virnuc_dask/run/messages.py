"""A remote failure, said as a local error that names the chunk and its sequences.

Dask re-raises a task's exception with the remote traceback attached; the run raises a new
exception instead, whose one line says which chunk failed (its sequences' first ids) and
what to do, so that the command line prints that line and nothing else.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from virnuc_dask.errors import VirnucError, option
from virnuc_dask.plan.partition import Chunk

if TYPE_CHECKING:
    from virnuc_dask.run.job import EmbeddingJob


def local_error(error: Exception, keys: dict[str, Chunk], job: EmbeddingJob) -> Exception:
    """The remote ``error`` as a local exception, naming the chunk and its sequences."""
    from distributed.scheduler import KilledWorker

    if isinstance(error, KilledWorker):
        found = re.search(r"embed-chunk-[0-9a-f]+-\d+", str(error))
        chunk = keys.get(found.group(0)) if found else None
        first = job.index.ids(job.partition.order[chunk.start : chunk.start + 5]) if chunk else []
        what = chunk.describe(first) if chunk else "a task of the run"
        limit = job.config.chunk_time_limit
        return VirnucError(
            f"{what} ended its worker several times: it ran past its time limit "
            f"({f'{limit:g} s' if limit else 'automatic'}; set {option('chunk_time_limit', 'S')}"
            f" to change it), or crashed the worker process (out of memory?). Finished chunks "
            f"are kept: rerun with {option('resume')}"
        )
    if isinstance(error, VirnucError):
        return type(error)(str(error))
    return RuntimeError(f"{type(error).__name__}: {error}")
