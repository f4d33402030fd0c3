"""What a finished run did: :class:`RunReport`, and its one-line summary.

The summary's rate is the run's one rate (:func:`~virnuc_dask.run.progress.rate`): tokens
embedded by this run over the seconds from the command's start to the file in place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from virnuc_dask.inputs.provenance import ReadProvenance, reads_summary
from virnuc_dask.output import ShardInfo
from virnuc_dask.plan.distinct import summary as distinct_summary


@dataclass(frozen=True)
class RunReport:
    """What a finished run did: counts, time, the tokens each worker embedded, phases.

    ``phases`` maps each step to its seconds on the driver's clock, in order: ``index``,
    ``cluster_start`` (a cluster :func:`embed` started), ``model_load`` (the workers' model
    plugin, less compiling), ``compile``, ``compute`` (first chunk submitted to last chunk
    written into the output), ``assembly`` (after the last chunk: checks and rename) and
    ``close`` (closing a cluster :func:`embed` started). The output file keeps the phases up
    to ``compute`` in its ``phases`` attribute (JSON).
    """

    output: str
    sequences: int
    tokens: int
    chunks: int
    reused: int
    seconds: float
    worker_tokens: dict[str, int]
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    #: Distinct sequences of the inputs, and how many of them came from the embedding cache
    #: (None: as many as ``sequences``, none cached).
    distinct: int | None = None
    cached: int = 0
    #: A run on reads: reads read, reads without any kept frame, and the first of their ids.
    reads: int | None = None
    reads_without_peptides: int = 0
    reads_without_peptides_first: tuple[str, ...] = ()

    @classmethod
    def from_shards(
        cls,
        output: str,
        shards: list[ShardInfo],
        seconds: float,
        phases: dict[str, float] | None = None,
        reads: ReadProvenance | None = None,
        *,
        sequences: int | None = None,
        distinct: int | None = None,
        cached: int = 0,
    ) -> RunReport:
        """Summarise the shards of a run (and its reads, for a run on reads).

        ``sequences``, ``distinct``, ``cached``: the inputs' rows, distinct sequences and
        those found in the embedding cache (default: the shards' sequences, all distinct).
        """
        per_worker: dict[str, int] = {}
        for shard in shards:
            per_worker[shard.worker] = per_worker.get(shard.worker, 0) + shard.tokens
        return cls(
            output=output,
            sequences=sum(s.sequences for s in shards) if sequences is None else sequences,
            tokens=sum(s.tokens for s in shards),
            chunks=len(shards),
            reused=sum(s.worker == "resumed" for s in shards),
            seconds=seconds,
            worker_tokens=per_worker,
            phases=dict(phases or {}),
            distinct=distinct,
            cached=cached,
            reads=reads.reads if reads is not None else None,
            reads_without_peptides=reads.without_peptides if reads is not None else 0,
            reads_without_peptides_first=tuple(reads.first_without) if reads is not None else (),
        )

    def phase_line(self) -> str:
        """Where the time went, one line: ``index 0.1 s, cluster_start 3.0 s, ...``."""
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())

    def summary(self) -> str:
        """One line for a person: sequences, tokens, time and throughput."""
        from virnuc_dask.run.progress import rate

        embedded = sum(t for w, t in self.worker_tokens.items() if w != "resumed")
        speed = rate(embedded, self.seconds)
        workers = len(set(self.worker_tokens) - {"resumed", "existing"})
        if self.distinct is None:
            counts = f"{self.sequences:,} sequences"
        else:
            counts = distinct_summary(self.sequences, self.distinct)
        if self.cached:
            counts += f", {self.cached:,} from the cache"
        line = (
            f"{counts}, {self.tokens:,} tokens in {self.chunks} chunks "
            f"({self.reused} reused) on {workers} worker{'s' if workers != 1 else ''}: "
            f"{self.seconds:.1f} s, {speed:,.0f} tokens/s"
        )
        if self.reads is not None:
            first = self.reads_without_peptides_first
            line += "; " + reads_summary(self.reads, self.reads_without_peptides, first)
        return line
