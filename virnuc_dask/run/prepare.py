"""Preparing a run on the driver: settings, paths, weights, inputs, partition; nothing computed.

:func:`prepare` checks every path relation, the model's weights and the inputs before anything
is created, locks the output and the work directory, indexes the inputs and partitions them
(or takes the saved partition of the run it resumes), and returns the
:class:`~virnuc_dask.run.job.EmbeddingJob`.

Decisions:

- With ``resume=True`` a run reuses the shards of an earlier run of the same inputs and
  settings (same fingerprint); without it an existing work directory is refused; shards of
  other settings are never discarded but with ``restart``.
- Inputs, work directory and outputs may be fsspec URLs (:mod:`~virnuc_dask.storage`). With
  the work directory at a URL the driver keeps a local folder of its own (in ``TMPDIR``,
  marked and removed at the end): inputs that must be staged are staged there and uploaded
  to the work directory, the index is saved there and uploaded, and a local cluster keeps
  its scratch space there. Outputs at URLs are built locally and uploaded
  (:mod:`~virnuc_dask.output.assembly`).
- Only the distinct sequences (:mod:`~virnuc_dask.plan.distinct`; every row with
  ``dedup=False``) that the embedding cache lacks (``cache``) are partitioned. The cache is
  opened before any work (a folder of the user's is refused then) and looked up once the
  inputs are indexed; a resumed run keeps the partition it resumes, and must be given the
  cache again if it took sequences from one.
- Whether a run compiles its engine is decided here for small runs (never) and left to each
  worker's engine for large ones (:mod:`~virnuc_dask.engine.compiling`).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
import uuid
from pathlib import Path

from virnuc_dask.cache.store import EmbeddingCache
from virnuc_dask.cluster.local import EarlyCluster
from virnuc_dask.config import EmbedConfig
from virnuc_dask.engine import compiling
from virnuc_dask.errors import Interrupted, VirnucError, option
from virnuc_dask.inputs import FastaIndex, index_inputs
from virnuc_dask.model.checkpoint import resolve_weights
from virnuc_dask.output import check_target, remove_stale_partials
from virnuc_dask.plan import distinct, fingerprint
from virnuc_dask.run import workdir
from virnuc_dask.run.job import LOCAL_FOLDER, EmbeddingJob, _engine_settings
from virnuc_dask.storage import ownership
from virnuc_dask.storage.paths import run_paths
from virnuc_dask.storage.remote import Remote, upload_folder
from virnuc_dask.storage.urls import StorageOptions, is_url

logger = logging.getLogger(__name__)


def prepare(
    inputs: list[str | Path],
    output: str | Path,
    *,
    client=None,
    lanes: int | None = None,
    zarr: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    restart: bool = False,
    overwrite: bool = False,
    torch_threads: int | None = None,
    on_gpu: bool | None = None,
    storage_options: dict | str | StorageOptions | None = None,
    early: EarlyCluster | None = None,
    **settings,
) -> EmbeddingJob:
    """Validate, index and partition on the driver; return the job, nothing computed yet.

    Every path relation, the model's weights and the inputs are checked before anything is
    created; nothing is left behind when a check fails.

    Parameters
    ----------
    inputs
        FASTA files, plain or gzip; with ``translate``, reads (FASTA or FASTQ, plain or gzip).
        Any may be an fsspec URL (``s3://bucket/a.fa``, ``https://...``); ``-`` reads
        standard input.
    output
        Final HDF5 path (its folder must exist), or an object store's URL.
    client
        The cluster the job will run on: gives ``lanes`` and ``on_gpu`` when they are not set.
    lanes
        Workers the partition deals to; default: the client's worker count, else 1.
    zarr
        Also write a Zarr v3 store here.
    work_dir
        Work directory (must not exist yet, unless resuming); default ``OUTPUT.work``.
    resume
        Reuse the shards of an earlier, interrupted run with the same fingerprint. Shards of
        other settings are never discarded: that is refused, naming what differs.
    restart
        Discard the finished chunks an earlier run left in the work directory, and start
        over.
    overwrite
        Replace an existing output file (and Zarr store written by this tool); the old one
        stays intact until the new one is complete.
    torch_threads
        torch threads per worker (CPU workers).
    on_gpu
        Whether the workers have GPUs: resolves ``dtype="auto"`` to bf16 (else fp32);
        default: asked of the client's workers, else False.
    storage_options
        fsspec options for the URLs (credentials, ``endpoint_url``, ...): a dict, a JSON
        text or ``@FILE``; they reach the workers with the run's settings and are never
        logged or written into the work directory or the output.
    early
        A local cluster to start once the checks have passed, while the inputs are indexed
        (:func:`embed` passes one); closed here if indexing fails.
    **settings
        Any field of :class:`~virnuc_dask.config.EmbedConfig`.
    """
    config = EmbedConfig.from_settings(**settings)
    storage = StorageOptions.of(storage_options)
    inputs = [str(p) for p in inputs]
    paths = run_paths(output, zarr, work_dir, inputs, storage)
    check_target(paths.output, "output", overwrite=overwrite)
    if paths.zarr is not None:
        check_target(paths.zarr, "zarr store", overwrite=overwrite)
    weights = resolve_weights(
        config.model,
        checkpoint=config.checkpoint,
        random_weights=config.random_weights,
        seed=config.seed,
    )
    if lanes is None:
        lanes = max(1, len(client.scheduler_info(n_workers=-1)["workers"])) if client else 1
    if on_gpu is None:
        on_gpu = _has_gpus(client) if client else False
    if config.dtype == "auto":
        config = dataclasses.replace(config, dtype="bf16" if on_gpu else "fp32")
    cache, cache_settings = None, None
    if config.cache is not None:
        # Opened (created) before any work: a folder of the user's is refused now.
        cache_settings = fingerprint.cache_settings(weights, config, on_gpu)
        cache = EmbeddingCache(config.cache, storage).namespace(cache_settings, create=True)
    token = uuid.uuid4().hex[:12]
    work = paths.work_dir
    clock = time.perf_counter()
    if resume and restart:
        raise VirnucError(f"{option('resume')} and {option('restart')} exclude each other")
    locks, saved = workdir.lock_and_open(paths.output, work, resume, token, restart=restart)
    local_dir = None
    try:
        for target in (paths.output, paths.zarr):
            if target is not None:
                for stale in remove_stale_partials(target):
                    logger.warning("removed %s, left by an assembly that was killed", stale)
        if isinstance(work, Remote):
            local_dir = Path(tempfile.gettempdir()) / f"virnuc-dask-{token}"
            ownership.claim(local_dir, LOCAL_FOLDER)
        local = local_dir if local_dir is not None else work
        if early is not None:
            # Built eager: whether this run compiles is known after indexing (the run's
            # plugin compiles it then, see engine/compiling).
            settings = _engine_settings(config, weights, torch_threads)
            early.start(dataclasses.replace(settings, compile=config.compile or False), local)
        index, reads = index_inputs(inputs, local / "staging", config, storage)
        identity = fingerprint.identity(index, weights, config)
        run_fingerprint = fingerprint.fingerprint_of(identity)
        sources = distinct.sources(index.digests) if config.dedup else distinct.identity(len(index))
        rows = distinct.distinct_rows(sources)
        if cache is not None:
            rows = rows[~cache.lookup(index.digests[rows]).found]
        parts, sources = workdir.saved_or_new_partition(
            work,
            saved,
            identity,
            index,
            lanes,
            config,
            restart=restart,
            sources=sources,
            rows=rows,
        )
        cached = len(distinct.distinct_rows(sources)) - len(parts.order)
        if cached and cache is None:
            raise VirnucError(
                f"the run in {work} took {cached:,} sequences from an embedding cache: "
                f"resume it with {option('cache', 'DIR')}, or {option('restart')} it"
            )
        index.save(local / "index")
        if reads is not None:
            reads.save(local / "index")
        if isinstance(work, Remote):
            _upload_index(index, local, work)
        reused = workdir.finished_shards(work, parts, run_fingerprint) if saved is not None else []
    except BaseException as error:
        try:
            if early is not None:
                early.close()  # its workers keep their scratch space in the work directory
            if saved is None:
                workdir.remove(work)
        finally:
            try:
                if local_dir is not None:
                    ownership.remove(local_dir, LOCAL_FOLDER)
            finally:
                for lock in reversed(locks):
                    lock.release()
        if isinstance(error, KeyboardInterrupt):
            kept = (None, 0) if saved is None else (work, workdir.finished_count(work))
            raise Interrupted(*kept) from None
        raise
    if saved is not None:
        logger.info(
            "resume: %d of %d chunks already finished and reused", len(reused), len(parts.chunks)
        )
    done = {s.chunk for s in reused}
    todo = sum(c.tokens for c in parts.chunks if c.number not in done)
    compile = compiling.run_setting(config.compile, on_gpu=on_gpu, tokens=todo, workers=lanes)
    config = dataclasses.replace(config, compile=compile)
    return EmbeddingJob(
        config,
        paths.output,
        paths.zarr,
        work,
        index,
        parts,
        weights,
        run_fingerprint,
        reused,
        torch_threads,
        sources=sources,
        cache_settings=cache_settings,
        cached=cached,
        token=token,
        overwrite=overwrite,
        phases={"index": time.perf_counter() - clock},
        locks=locks,
        reads=reads,
        storage=storage,
        local_dir=local_dir,
    )


def _upload_index(index: FastaIndex, local: Path, work: Remote) -> None:
    """Put the staged inputs and the saved index into a work directory at a URL.

    Staged files (gzip inputs, standard input, the peptides of reads) are read by the workers
    from the work directory's URL: the index names them there, saved again after the change.
    """
    staged = (local / "staging").resolve()
    for number, name in enumerate(index.files):
        path = Path(name).resolve()
        if not is_url(name) and staged in path.parents:
            target = work / "staging" / path.name
            target.put(path)
            index.files[number] = str(target)
    index.save(local / "index")
    upload_folder(local / "index", work / "index")


def _has_gpus(client) -> bool:
    """Whether every worker of the cluster sees a CUDA device."""

    def cuda_available() -> bool:
        import torch

        return torch.cuda.is_available()

    answers = client.run(cuda_available)
    return bool(answers) and all(answers.values())
