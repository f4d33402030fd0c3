"""The one call: :func:`embed` prepares a run, finds or starts its cluster, and runs it.

Decisions:

- With neither a client nor a scheduler, a local cluster that fits the machine is started
  while the inputs are indexed (:class:`~virnuc_dask.cluster.local.EarlyCluster`), once the
  settings, paths and weights have been checked, so that usage errors answer before any
  worker starts. Inputs under :data:`EARLY_START_BYTES` are indexed first: a malformed record
  then answers at once, with no cluster to start and close.
- The local cluster's workers keep their scratch space in the work directory, so the run
  writes nothing outside it and the output; it goes once the cluster has closed.
- A run with nothing to compute (every sequence in the embedding cache, or every chunk
  resumed) starts no cluster and loads no model: its output is assembled on the driver. With
  an embedding cache the local cluster starts after the lookup, so that a fully cached rerun
  never starts one.
- A script that calls ``embed()`` at top level without a main guard is stopped before
  anything starts (:mod:`~virnuc_dask.run.guards`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path

import dask

from virnuc_dask.cluster.local import EarlyCluster
from virnuc_dask.config import CLUSTERS
from virnuc_dask.errors import Interrupted, VirnucError, option
from virnuc_dask.run.guards import _refuse_an_unguarded_script, _refuse_inside_a_starting_worker
from virnuc_dask.run.job import EmbeddingJob
from virnuc_dask.run.prepare import prepare
from virnuc_dask.storage.urls import StorageOptions, is_url

logger = logging.getLogger(__name__)


def embed(
    inputs: list[str | Path] | str | Path,
    output: str | Path,
    *,
    client=None,
    cluster: str | None = None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    zarr: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    restart: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict | str | StorageOptions | None = None,
    slurm: dict | None = None,
    **settings,
) -> Path | str | None:
    """Embed every sequence of ``inputs`` with ESM-2 into one HDF5 file; return its path.

    Parameters
    ----------
    inputs
        FASTA file(s), plain or gzip; with ``translate="six-frame"``, nucleotide reads (FASTA
        or FASTQ, plain or gzip), whose peptides are embedded.
    output
        The HDF5 file to write (its folder must exist).
    client
        A ``distributed.Client`` to run on; default: connect to ``scheduler`` /
        ``scheduler_file``, or start a local cluster that fits the machine.
    cluster
        Where the workers come from when no ``client`` or scheduler is given: ``"local"``
        (the default: a local cluster that fits the machine), ``"slurm"`` (workers as Slurm
        jobs through dask-jobqueue, :mod:`~virnuc_dask.cluster.slurm`) or
        ``"slurm-allocation"`` (inside one ``srun``: rank 0 the scheduler and driver, the
        other ranks workers, :mod:`~virnuc_dask.cluster.allocation`). Default:
        ``virnuc-dask.cluster``.
    scheduler, scheduler_file
        An existing Dask scheduler to use instead of a local cluster. With
        ``cluster="slurm-allocation"``, ``scheduler_file`` is where rank 0 writes its
        scheduler's address for the other ranks.
    zarr
        Also write the same content as a Zarr v3 store.
    work_dir
        Work directory for shards; default ``OUTPUT.work``.
    resume
        Reuse the finished shards of an interrupted run (of the same inputs and settings).
    restart
        Discard the finished shards an earlier run left in the work directory.
    overwrite
        Replace an existing output (only once the new one is complete).
    progress
        Show progress.
    storage_options
        fsspec options for inputs, work directory and outputs given as URLs (``s3://``,
        ``gs://``, ``https://``): a dict, a JSON text or ``@FILE``. Credentials are best left
        to the standard places (``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, the environment).
    slurm
        With ``cluster="slurm"``: the worker jobs' settings (``jobs``, ``gpus_per_job``,
        ``cores``, ``memory``, ``partition``, ``account``, ``walltime``, ``job_extra``),
        over ``virnuc-dask.slurm`` and dask-jobqueue's ``jobqueue.slurm``
        (:class:`~virnuc_dask.cluster.slurm.SlurmSettings`).
    **settings
        Fields of :class:`~virnuc_dask.config.EmbedConfig`: ``model``, ``checkpoint``,
        ``random_weights``, ``seed``, ``layers``, ``dtype``, ``output_dtype``,
        ``max_residues``, ``tokens_per_batch``, ``chunk_tokens``, ``workers``,
        ``invalid_to_x``, ``as_protein``, ``duplicate_ids``, ``compile``, ``retries``,
        ``chunk_time_limit``, ``wait_limit``, ``per_residue``, ``residue_dtype``, ``long``;
        for nucleotide reads ``translate="six-frame"``
        with ``genetic_code``, ``frames``, ``min_peptide`` and ``split_bp``.

    Returns
    -------
    The output's path; None on the worker ranks of ``cluster="slurm-allocation"``.

    Examples
    --------
    >>> import virnuc_dask
    >>> path = virnuc_dask.embed("proteins.fasta", "proteins.h5",
    ...                          model="esm2_t6_8M_UR50D")  # doctest: +SKIP
    >>> virnuc_dask.open_embeddings(path).embedding.shape  # doctest: +SKIP
    (15, 320)
    """
    from virnuc_dask.cluster.hardware import local_plan

    _refuse_inside_a_starting_worker()
    inputs = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    options = dict(
        zarr=zarr,
        work_dir=work_dir,
        resume=resume,
        restart=restart,
        overwrite=overwrite,
        storage_options=storage_options,
    )
    if client is not None:
        job = prepare(inputs, output, client=client, **options, **settings)
        return job.run(client, progress=progress)
    kind = _cluster_kind(cluster, scheduler, scheduler_file)
    if slurm and kind != "slurm":
        raise VirnucError(f"the Slurm settings apply to {option('cluster', 'slurm')}")
    if kind == "slurm-allocation":
        from virnuc_dask.cluster.allocation import embed_in_allocation

        return embed_in_allocation(
            inputs, output, scheduler_file=scheduler_file, progress=progress, **options, **settings
        )
    if kind == "slurm":
        return _embed_on_slurm(inputs, output, slurm, progress, options, settings)
    if kind == "existing":
        from virnuc_dask.cluster.existing import connect

        clock = time.perf_counter()
        with connect(scheduler=scheduler, scheduler_file=scheduler_file) as (client, info):
            connected = time.perf_counter() - clock
            job = prepare(inputs, output, client=client, **options, **settings)
            job.phases = {"cluster_start": connected, **job.phases}
            return job.run(client, progress=progress)
    # A local cluster: check settings, paths and weights first, so usage errors answer before
    # any worker starts; then start the cluster while the inputs are indexed. The workers
    # keep their scratch space in the work directory, so the run writes nothing outside it
    # and the output; it goes once the cluster has closed.
    _refuse_an_unguarded_script()
    plan = local_plan(settings.get("workers") or dask.config.get("virnuc-dask.workers"))
    cluster = EarlyCluster(plan)
    # Small inputs are indexed first: a malformed record then answers at once, with no
    # cluster to start and close. So are a run's inputs with an embedding cache: when every
    # sequence is found there, no cluster starts at all.
    cache = settings.get("cache") or dask.config.get("virnuc-dask.cache")
    early = _input_bytes(inputs) >= EARLY_START_BYTES and not cache
    job = prepare(
        inputs,
        output,
        lanes=plan.workers,
        torch_threads=plan.torch_threads,
        on_gpu=plan.gpus > 0,
        early=cluster if early else None,
        **options,
        **settings,
    )
    return _run_and_finish(
        job, progress, lambda: _run_on(cluster, job, early, progress), started=early
    )


def _embed_on_slurm(inputs, output, slurm: dict | None, progress: bool, options, settings):
    """:func:`embed` on worker jobs of Slurm (``cluster="slurm"``)."""
    from virnuc_dask.cluster.slurm import SlurmSettings, check_jobs

    # Settings and the job itself are checked before anything is created.
    slurm_settings = SlurmSettings.from_settings(slurm)
    check_jobs(slurm_settings)
    job = prepare(
        inputs,
        output,
        lanes=slurm_settings.max_workers,
        torch_threads=slurm_settings.torch_threads,
        on_gpu=slurm_settings.gpus_per_job > 0,
        **options,
        **settings,
    )
    return _run_and_finish(job, progress, lambda: _run_on_slurm(job, slurm_settings, progress))


def _run_and_finish(job: EmbeddingJob, progress: bool, run_on_cluster, started: bool = False):
    """Run ``job`` with ``run_on_cluster()`` (which closes its cluster); then finish the job.

    A job with nothing to compute (every sequence cached, every chunk resumed) is assembled
    without a cluster, unless one was ``started`` already (``run_on_cluster`` closes it). The
    work directory stays for resume unless the run succeeded, and the locks go, once the
    cluster that used them has closed.
    """
    path, interrupted = None, False
    try:
        if job.todo or started:
            path = run_on_cluster()
        else:
            path = job.run(None, progress=progress, cleanup=False)
    except KeyboardInterrupt:
        # Interrupted while the cluster closed, the output complete: the run succeeded.
        interrupted = path is None
    finally:
        job.finish(success=path is not None, interrupted=interrupted)
    if interrupted:
        raise Interrupted(*job.kept)
    return path


def _run_on_slurm(job: EmbeddingJob, settings, progress: bool):
    """Run ``job`` on worker jobs of Slurm scaled to its chunks; cancel every job after."""
    from virnuc_dask.cluster.slurm import slurm_workers

    logs = None if is_url(str(job.work_dir)) else Path(job.work_dir) / "slurm"
    clock = time.perf_counter()
    with slurm_workers(settings, len(job.todo), logs) as (client, workers):
        job.phases["cluster_start"] = time.perf_counter() - clock
        try:
            path = job.run(client, progress=progress, cleanup=False, scaler=workers)
        finally:
            clock = time.perf_counter()  # the cluster's close, from here
    _closed(job, time.perf_counter() - clock)
    return path


def _run_on(cluster: EarlyCluster, job: EmbeddingJob, early: bool, progress: bool):
    """Run ``job`` on the local cluster (started now unless it was started early), close it."""
    try:
        if not early:
            cluster.start(job.engine_settings, job.local)
        client, info = cluster.result()
        # What the driver waited for after indexing (all of the start, for small inputs).
        job.phases["cluster_start"] = cluster.waited
        path = job.run(client, progress=progress, cleanup=False)
    finally:
        clock = time.perf_counter()
        cluster.close()  # waits for a start under way: nothing outlives the run
    _closed(job, time.perf_counter() - clock)
    return path


def _cluster_kind(cluster: str | None, scheduler, scheduler_file) -> str:
    """The cluster a run uses: ``cluster`` (else ``virnuc-dask.cluster``), or ``"existing"``.

    A scheduler given (address or file) wins over a configured kind, but not over one given
    in the same call: ``cluster="slurm"`` with a scheduler is refused. In an allocation the
    scheduler file is where rank 0 writes its address.
    """
    kind = cluster or dask.config.get("virnuc-dask.cluster") or "local"
    if kind not in CLUSTERS:
        raise VirnucError(f"cluster must be one of {', '.join(CLUSTERS)}, not {kind!r}")
    if kind == "slurm-allocation":
        if scheduler:
            raise VirnucError(
                f"{option('cluster', kind)} starts its scheduler on rank 0: drop "
                f"{option('scheduler', scheduler)}"
            )
        return kind
    if scheduler or scheduler_file:
        if cluster == "slurm":
            given = (
                option("scheduler", scheduler)
                if scheduler
                else option("scheduler_file", scheduler_file)
            )
            raise VirnucError(
                f"{option('cluster', 'slurm')} starts its own scheduler: drop {given}"
            )
        return "existing"
    return kind


#: Inputs of at least this many bytes are indexed while the local cluster starts.
EARLY_START_BYTES = 4 * 2**20


def _input_bytes(inputs: list) -> float:
    """Bytes of the local input files; infinite when one is a URL or standard input."""
    total = 0
    for item in inputs:
        if is_url(str(item)) or str(item) == "-":
            return float("inf")
        with contextlib.suppress(OSError):  # prepare() names a missing file
            total += os.path.getsize(item)
    return total


def _closed(job: EmbeddingJob, seconds: float) -> None:
    """Add the cluster's closing time to the job's report."""
    phases = {**job.report.phases, "close": round(seconds, 3)}
    job.report = dataclasses.replace(job.report, phases=phases)
    logger.debug("phases: %s", job.report.phase_line())
