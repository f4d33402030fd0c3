"""The graph of a run: one Dask task per chunk still to do, ending in the output file.

:class:`EmbeddingGraph` is a Dask collection. Its tasks are the chunk tasks
(:func:`~virnuc_dask.cluster.task.embed_chunk`, each given its chunk and the job's
:class:`~virnuc_dask.cluster.task.ChunkJob`); computing it (``dask.compute(graph)``,
``graph.compute()`` or ``client.compute(graph)``) runs them and then assembles their shards
into the output as its last step (:func:`~virnuc_dask.output.assembly.assemble_shards`),
returning the output's path. ``EmbeddingJob.run`` computes the same graph's tasks and feeds
the same assembly on the driver as each chunk finishes, so the file is complete moments after
the last chunk: the graph a notebook draws (``graph.visualize()``, ``graph.dask``) is the one
that runs.

Decisions:

- Every key of a graph carries a token unique to that graph
  (``embed-chunk-<token>-000001``): two runs on one scheduler never share (or return) each
  other's tasks, and a failed run's errored tasks never answer for the next run.
- Tasks are prioritised by their place in their lane, so the longest sequences of every lane
  run first and the run ends on short, quick chunks; each task is retried up to the run's
  ``retries``.
- The assembly is Dask's finalize step of the collection, not a task of the graph: Dask runs
  it after the chunk tasks, on a worker (a distributed scheduler) or in this process.
"""

from __future__ import annotations

import uuid

import dask
from dask.highlevelgraph import HighLevelGraph
from dask.threaded import get as threaded_get

from virnuc_dask.output.assembly import AssemblyPlan, assemble_shards
from virnuc_dask.output.shards import ShardInfo
from virnuc_dask.plan.partition import Chunk


class EmbeddingGraph:
    """The unevaluated graph of a run; computed, the output's path.

    Parameters
    ----------
    job
        The prepared run (:class:`~virnuc_dask.run.job.EmbeddingJob`).
    token
        The token in every key; default: a new one.

    Attributes
    ----------
    tasks
        One ``dask.delayed`` task per chunk still to do, in chunk order.
    chunks
        Each task's key, mapped to its chunk.
    plan
        What the assembly builds the output from.
    reused
        The shards of an earlier run that go into the output as they are (resume).
    """

    def __init__(self, job, token: str | None = None) -> None:
        from virnuc_dask.cluster.task import embed_chunk

        self.token = token or uuid.uuid4().hex[:12]
        job_node = dask.delayed(job.chunk_job(), name=f"virnuc-job-{self.token}")
        rank = _rank_in_lane(job.partition.chunks)
        self.chunks: dict[str, Chunk] = {}
        self.tasks = []
        for chunk in job.todo:
            name = f"embed-chunk-{self.token}-{chunk.number:06d}"
            self.chunks[name] = chunk
            with dask.annotate(priority=-rank[chunk.number], retries=job.config.retries):
                self.tasks.append(dask.delayed(embed_chunk)(chunk, job_node, dask_key_name=name))
        self.plan: AssemblyPlan = job.assembly_plan()
        self.reused: tuple[ShardInfo, ...] = tuple(job.reused)
        graphs = [task.__dask_graph__() for task in self.tasks]
        self._graph = HighLevelGraph.merge(*graphs) if graphs else HighLevelGraph({}, {})

    @property
    def dask(self) -> HighLevelGraph:
        """The graph's tasks (in Jupyter, Dask's summary of them)."""
        return self._graph

    def __dask_graph__(self) -> HighLevelGraph:
        return self._graph

    def __dask_keys__(self) -> list[str]:
        return list(self.chunks)

    def __dask_layers__(self) -> tuple[str, ...]:
        return tuple(self._graph.layers)

    def __dask_postcompute__(self):
        return assemble_shards, (self.plan, self.reused)

    def __dask_postpersist__(self):
        raise NotImplementedError("an embedding graph is computed, not persisted")

    def __dask_tokenize__(self) -> str:
        return f"virnuc-graph-{self.token}"

    # The class's own ``dask`` (the graph) hides the module here: the scheduler by its name.
    __dask_scheduler__ = staticmethod(threaded_get)

    @staticmethod
    def __dask_optimize__(graph, keys, **kwargs):
        return graph  # the tasks are what they are: nothing to cull or fuse

    def compute(self, **kwargs) -> str:
        """Compute the graph on the current scheduler; return the output's path."""
        (path,) = dask.compute(self, **kwargs)
        return path

    def visualize(self, filename: str = "embedding-graph", **kwargs):
        """Draw the graph's tasks with Graphviz (``dask.visualize``)."""
        return dask.visualize(self, filename=filename, **kwargs)

    def __repr__(self) -> str:
        return f"EmbeddingGraph({len(self.tasks)} chunk tasks, {len(self.reused)} reused shards)"


def _rank_in_lane(chunks: list[Chunk]) -> dict[int, int]:
    """Each chunk's place among the chunks of its lane (0: the lane's first, longest)."""
    seen: dict[int, int] = {}
    rank = {}
    for chunk in chunks:
        rank[chunk.number] = seen.get(chunk.lane, 0)
        seen[chunk.lane] = rank[chunk.number] + 1
    return rank
