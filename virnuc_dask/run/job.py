"""The prepared run: :class:`EmbeddingJob` holds what the driver knows before computing.

:func:`~virnuc_dask.run.prepare.prepare` returns one: indexed inputs, their partition, the
weights, the fingerprint, the shards an earlier run left (resume), and the locks. Its
:meth:`~EmbeddingJob.graph` is the run's Dask graph (:mod:`~virnuc_dask.run.graph`);
:meth:`~EmbeddingJob.run` computes it (:mod:`~virnuc_dask.run.execute`);
:meth:`~EmbeddingJob.finish` cleans up.

Decisions:

- Work directory (default ``OUTPUT.work``, next to the output): the index, the partition, gzip
  inputs decompressed for seeking, and one shard per finished chunk. It is removed after a
  successful run, and after a failure that happened before the first shard was written (there
  is nothing to resume then); otherwise it is kept for ``resume``. It is removed *before* the
  locks are released, so no run can start using it while it is being deleted.
- The output's attributes say what made it: the model and weights, layers, pooling, dtypes,
  the windows rule, every package's version, the inputs' absolute paths, the fingerprint and
  the run's token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from virnuc_dask.config import EmbedConfig
from virnuc_dask.errors import option
from virnuc_dask.inputs import FastaIndex
from virnuc_dask.inputs.provenance import ReadProvenance
from virnuc_dask.model.registry import model_spec
from virnuc_dask.model.weights import WeightsSource
from virnuc_dask.output import POOLING, ShardInfo
from virnuc_dask.output.assembly import Assembly, AssemblyPlan
from virnuc_dask.plan.distinct import distinct_rows
from virnuc_dask.plan.distinct import summary as distinct_summary
from virnuc_dask.plan.partition import Chunk, Partition
from virnuc_dask.plan.windows import WINDOWS_RULE
from virnuc_dask.run import workdir
from virnuc_dask.run.report import RunReport
from virnuc_dask.storage import ownership
from virnuc_dask.storage.locks import RunLock
from virnuc_dask.storage.remote import Remote, place
from virnuc_dask.storage.urls import StorageOptions

if TYPE_CHECKING:
    from virnuc_dask.cluster.plugin import EngineSettings
    from virnuc_dask.cluster.task import ChunkJob
    from virnuc_dask.run.graph import EmbeddingGraph
logger = logging.getLogger(__name__)


@dataclass
class EmbeddingJob:
    """A prepared run: indexed inputs, chunks, and the settings every task shares.

    Attributes
    ----------
    config
        The run's settings.
    output
        Final HDF5 path.
    zarr
        Optional Zarr store path.
    work_dir
        The run's work directory.
    index
        The inputs' index.
    partition
        The chunks.
    weights
        Where the model's weights come from.
    fingerprint
        Identity of the inputs' contents and of every setting that changes the numbers.
    reused
        Shards of an earlier run that are reused (resume).
    torch_threads
        torch threads per CPU worker.
    sources
        Each input row's source row: the row whose values it gets
        (:mod:`~virnuc_dask.plan.distinct`); only sources are partitioned.
    cache_settings
        With an embedding cache (``config.cache``), what its entries are keyed by.
    cached
        Distinct sequences found in the embedding cache (in no chunk).
    token
        This job's token, in its locks and output attributes.
    overwrite
        Replace an existing output (only once the new one is complete).
    report
        What the run did, once :meth:`run` has finished.
    phases
        Seconds of the phases before the run (``index``; ``cluster_start`` from :func:`embed`).
    locks
        The output's and work directory's locks, held from :func:`prepare` until :meth:`run`
        ends (or :meth:`finish`).
    reads
        For a run on reads (``translate``): where each peptide comes from; else None.
    storage
        fsspec options for the URLs among the inputs, work directory and outputs.
    local_dir
        The driver's own folder when the work directory is a URL (staging, the outputs'
        local copies, a local cluster's scratch space); else None (the work directory).
    """

    config: EmbedConfig
    output: Path | Remote
    zarr: Path | Remote | None
    work_dir: Path | Remote
    index: FastaIndex
    partition: Partition
    weights: WeightsSource
    fingerprint: str
    reused: list[ShardInfo]
    torch_threads: int | None = None
    sources: np.ndarray | None = None
    cache_settings: dict | None = None
    cached: int = 0
    token: str = ""
    overwrite: bool = False
    report: RunReport | None = None
    #: What :meth:`finish` kept for resume: the work directory and its finished chunks.
    kept: tuple = (None, 0)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    locks: list[RunLock] = dataclasses.field(default_factory=list, repr=False)
    reads: ReadProvenance | None = None
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)
    local_dir: Path | None = None
    published: bool = dataclasses.field(default=False, repr=False)

    @property
    def local(self) -> Path:
        """The driver's local folder: the work directory, or its own when that is a URL."""
        return self.local_dir if self.local_dir is not None else self.work_dir

    @property
    def engine_settings(self) -> EngineSettings:
        """What each worker's :class:`~virnuc_dask.cluster.plugin.ModelPlugin` loads."""
        return _engine_settings(self.config, self.weights, self.torch_threads)

    @property
    def todo(self) -> list[Chunk]:
        """Chunks still to compute."""
        done = {s.chunk for s in self.reused}
        return [c for c in self.partition.chunks if c.number not in done]

    def graph(self) -> EmbeddingGraph:
        """The unevaluated graph: one task per chunk still to do, ending in the output.

        Computed on a user's client (``dask.compute(graph)``, ``client.compute(graph)``), it
        writes the output and returns its path; :meth:`run` computes it with the output built
        while the chunks finish. Each call names its keys with a new token.
        """
        from virnuc_dask.run.graph import EmbeddingGraph

        return EmbeddingGraph(self)

    def chunk_job(self) -> ChunkJob:
        """What every chunk task of this job is given besides its chunk."""
        from virnuc_dask.cluster.task import ChunkJob

        return ChunkJob(
            index_dir=str(self.work_dir / "index"),
            order_path=str(self.work_dir / "order.npy"),
            shard_dir=str(self.work_dir / "shards"),
            fingerprint=self.fingerprint,
            output_dtype=self.config.output_dtype,
            engine=self.engine_settings,
            lock_path=str(self.work_dir / "lock"),
            token=self.token,
            width=model_spec(self.config.model).embed_dim,
            chunk_seconds=self.config.chunk_time_limit,
            storage=self.storage,
            per_residue=self.config.per_residue,
            residue_dtype=self.config.residue_dtype,
            long=self.config.long,
        )

    def assembly_plan(self) -> AssemblyPlan:
        """What the output is built from besides the shards (the graph's and :meth:`run`'s)."""
        c = self.config
        return AssemblyPlan(
            output=str(self.output),
            zarr=str(self.zarr) if self.zarr else None,
            index_dir=str(self.work_dir / "index"),
            order_path=str(self.work_dir / "order.npy"),
            sources_path=str(self.work_dir / "sources.npy"),
            chunk_bounds=tuple((chunk.start, chunk.stop) for chunk in self.partition.chunks),
            residue_dtype=c.residue_dtype if c.per_residue else None,
            writer=dict(
                max_residues=c.max_residues,
                layers=c.layer_list(),
                width=model_spec(c.model).embed_dim,
                attrs=self.attributes(),
                dtype=c.output_dtype,
                fingerprint=self.fingerprint,
                overwrite=self.overwrite,
                long=c.long,
            ),
            storage=self.storage,
            cache=c.cache,
            cache_settings=self.cache_settings,
        )

    def assembly(self) -> Assembly:
        """The output, opened on the driver with the index this job holds."""
        return Assembly(
            self.assembly_plan(),
            index=self.index,
            reads=self.reads,
            order=self.partition.order,
            sources=self.sources,
            folder=self.local,
        )

    @property
    def distinct(self) -> int:
        """Distinct sequences of the inputs (rows that are their own source)."""
        return len(distinct_rows(self.sources)) if self.sources is not None else len(self.index)

    def attributes(self) -> dict:
        """Attributes of the output file (netCDF-compatible values only)."""
        from importlib import metadata

        import virnuc_dask

        c = self.config
        versions = {
            "virnuc_dask": virnuc_dask.__version__,
            **{name: metadata.version(name) for name in _VERSIONED},
        }
        return {
            "model": c.model,
            "layers": np.array(c.layer_list(), dtype=np.int32),
            "pooling": POOLING,
            "compute_dtype": c.dtype,
            "max_residues": c.max_residues,
            "long": c.long,
            **({"windows_rule": WINDOWS_RULE} if c.long == "window" else {}),
            "per_residue": "yes" if c.per_residue else "no",
            **({"residue_dtype": c.residue_dtype} if c.per_residue else {}),
            "weights": self.weights.describe(),
            "random_weights": "yes" if self.weights.is_random else "no",
            "versions": json.dumps(versions),
            # Where the inputs were, as the file will still say after it is moved or shared.
            "inputs": json.dumps([_absolute(p) for p in self.index.inputs]),
            "fingerprint": self.fingerprint,
            "run": self.token,
            "sequences": len(self.index),
            "distinct_sequences": self.distinct,
            "duplicates": distinct_summary(len(self.index), self.distinct),
            "from_cache": self.cached,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **(self.reads.attributes() if self.reads is not None else {}),
        }

    def run(
        self,
        client,
        *,
        progress: bool = True,
        cleanup: bool = True,
        graph: EmbeddingGraph | None = None,
        scaler=None,
    ) -> Path | str:
        """Register the model plugin on ``client``'s workers and compute the graph.

        The output is built on the driver as the chunks finish. Returns the output path.
        When the run fails, its futures are cancelled and released, and the error is raised as
        a local exception naming the chunk and its sequences; finished shards stay in the work
        directory for ``resume``.

        Parameters
        ----------
        client
            A ``distributed.Client``.
        progress
            Show chunks and tokens done, rate and time left.
        cleanup
            Remove the work directory (after success, or after a failure before any shard)
            and release the locks when the run ends. With False the caller does it with
            :meth:`finish`, e.g. once a local cluster using the work directory has closed.
        graph
            The graph to compute (one :meth:`graph` returned, e.g. drawn first in a
            notebook); default: a new one.
        scaler
            What keeps a cluster's size fitted to the chunks left, and says what is pending
            (:class:`~virnuc_dask.cluster.slurm.SlurmWorkers`); None for fixed clusters.
        """
        from virnuc_dask.run.execute import execute

        return execute(
            self, client, graph or self.graph(), progress=progress, cleanup=cleanup, scaler=scaler
        )

    def _output_complete(self) -> bool:
        """Whether this run's output is in place (its ``run`` attribute is this job's token)."""
        import h5py

        if isinstance(self.output, Remote) or isinstance(self.zarr, Remote):
            return self.published
        try:
            with h5py.File(self.output, "r") as f:
                ours = f.attrs.get("run") == self.token
        except OSError:
            return False
        return ours and (self.zarr is None or self.zarr.exists())

    def finish(self, *, success: bool, interrupted: bool = False) -> None:
        """Remove the work directory (after success, or when it holds no shard), then unlock.

        Called by :meth:`run`; call it yourself for a job never run or run with
        ``cleanup=False``. The work directory goes before the locks, so that no other run can
        take it while it is being removed. What is kept is recorded in :attr:`kept`, and said
        in a warning unless the run was ``interrupted`` (the raised
        :class:`~virnuc_dask.errors.Interrupted` says it then).
        """
        try:
            self.kept = (None, 0)
            if success:
                workdir.remove(self.work_dir)
            elif workdir.remove_if_unused(self.work_dir):
                logger.info("nothing finished yet: removed the work directory %s", self.work_dir)
            else:
                self.kept = (self.work_dir, workdir.finished_count(self.work_dir))
                # After an interrupt the raised Interrupted says it, once.
                (logger.debug if interrupted else logger.warning)(
                    "finished chunks are kept in %s: rerun with %s to reuse them",
                    self.work_dir,
                    option("resume"),
                )
        finally:
            try:
                if self.local_dir is not None:
                    ownership.remove(self.local_dir, LOCAL_FOLDER)
            finally:
                self.release()

    def release(self) -> None:
        """Release the run's locks (done by :meth:`finish`)."""
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()


#: The kind of the driver's own local folder, when the work directory is a URL.
LOCAL_FOLDER = "driver folder"


def _engine_settings(
    config: EmbedConfig, weights: WeightsSource, torch_threads: int | None
) -> EngineSettings:
    from virnuc_dask.cluster.plugin import EngineSettings

    return EngineSettings(
        weights=weights,
        dtype=config.dtype,
        layers=tuple(config.layer_list()),
        max_residues=config.max_residues,
        tokens_per_batch=config.tokens_per_batch,
        compile=config.compile,
        torch_threads=torch_threads,
    )


#: Packages whose versions every output file records.
_VERSIONED = ("torch", "fair-esm", "dask", "distributed", "h5py", "xarray")


def _absolute(path: str) -> str:
    """A local input's absolute path; a URL, or ``-`` (standard input), as it is."""
    return path if path == "-" else str(place(path).absolute())
