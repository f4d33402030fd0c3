"""Worker side: the model stays resident on each worker, and one task embeds one chunk.

:class:`ModelPlugin` is a ``distributed.WorkerPlugin``: registered once per run, it builds the
engine on every worker (and on workers that join later), off the event loop so heartbeats go
on while a 3B model loads. The model never travels through the scheduler: the plugin carries
only the description of the weights. :func:`embed_chunk` is the task body; it finds the engine
through ``get_worker()``, reads its sequences by offset, embeds them and writes one shard.

Decisions:

- A chunk whose shard is already on disk with the run's fingerprint and rows is not computed
  again: when Dask re-runs a finished task because its small result lived on a lost worker,
  the task returns the shard at once, so a lost worker costs only its chunk in flight.
- A task writes its shard only while its run still holds the work directory's lock (the
  lock carries the run's token): a task that outlives an interrupted run writes nothing.
- Each chunk has a time limit (:func:`time_limit`): :data:`SLACK` times its expected time at
  the slowest speed this worker has measured for the same engine, or, before any, at a speed
  assumed of the device (:func:`assumed_rate`, far below the real one); the chunk's first
  batch then sets the limit its own speed asks for, and later batches only lengthen it
  (:class:`_Watchdog`). A restarted worker starts from the assumed speed again, which never
  ends a healthy chunk. A chunk past its limit ends its worker process
  (a hung GPU call or a deadlock cannot be interrupted from Python): the nanny starts a new
  worker and the scheduler gives the chunk to a worker again, up to Dask's
  ``distributed.scheduler.allowed-failures`` times; then the run stops naming the chunk.
- A work directory at a URL: the worker copies the saved index and partition to its own disk
  once per run (its Dask local directory, :func:`_local_copy`) and memory-maps them there, as
  it would on a shared filesystem; its inputs it reads by byte range from their URLs; its
  shard it writes to its own disk and puts in one call (atomic on object stores). So the
  worker needs nothing of the driver's disk, only the store and the run's storage options.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from distributed import WorkerPlugin, get_worker

from virnuc_dask.errors import VirnucError
from virnuc_dask.model.weights import WeightsSource
from virnuc_dask.output import ShardInfo, shard_matches, write_shard
from virnuc_dask.output.residues import ShardResidues
from virnuc_dask.output.targets import partial_name
from virnuc_dask.plan.partition import Chunk
from virnuc_dask.plan.windows import embedded_residues
from virnuc_dask.progress import BatchReporter
from virnuc_dask.storage.locks import holds
from virnuc_dask.storage.remote import Remote, download_folder
from virnuc_dask.storage.urls import StorageOptions, is_url
from virnuc_dask.workdir import shard_path

logger = logging.getLogger(__name__)

PLUGIN_NAME = "virnuc-dask-model"
#: The time limit is this many times the chunk's expected time.
SLACK = 10.0
#: No chunk is given less than this.
MIN_CHUNK_SECONDS = 120.0
#: Floating-point operations per second assumed of a device before this worker has measured
#: its engine: far below what they do (a 2-core CPU runs ESM-2 150M in fp32 at about 10
#: GFLOP/s a thread, an H200 runs 3B in bf16 at about 600 TFLOP/s), so that the limit of a
#: healthy first chunk is never too short. A CPU's figure is per torch thread.
ASSUMED_FLOPS = {"cpu": 1e9, "cuda": 20e12}


class ChunkError(VirnucError):
    """A chunk whose embedding failed, naming the chunk and its sequences.

    Dask retries the task a bounded number of times (``retries``); if it still fails, the run
    stops with this message and the finished shards stay for ``--resume``.
    """


class RunAbandoned(VirnucError):
    """A chunk task whose run no longer holds the work directory: its result is discarded."""


# The per-worker engine cache: reused when a later run on the same cluster asks for the same
# model and settings, replaced when it asks for another. Plain `dask worker` runs several task
# threads: the lock makes sure one engine is built at a time.
_ENGINES: dict[EngineSettings, object] = {}
_ENGINES_LOCK = threading.Lock()
# What the last plugin setup of this worker did (for the run report's phases).
_SETUP: dict[str, object] = {
    "load_seconds": 0.0,
    "compile_seconds": 0.0,
    "reused": True,
    "detail": {},
    "early": False,
}
# The slowest tokens per second a chunk of each engine has run at in this worker process,
# keyed by engine_key() (time limits): a speed of the 8M model says nothing of the 3B.
_SLOWEST_RATES: dict[EngineSettings, float] = {}


@dataclass(frozen=True)
class EngineSettings:
    """What a worker needs to build its engine (small, sent once per run)."""

    weights: WeightsSource
    dtype: str
    layers: tuple[int, ...]
    max_residues: int
    tokens_per_batch: int | None
    compile: bool | None
    torch_threads: int | None = None

    def to_json(self) -> str:
        """These settings as one JSON string (a preload's command-line argument)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EngineSettings:
        """The settings :meth:`to_json` wrote."""
        fields = json.loads(text)
        fields["weights"] = WeightsSource(**fields["weights"])
        fields["layers"] = tuple(fields["layers"])
        return cls(**fields)


class ModelPlugin(WorkerPlugin):
    """Load the ESM-2 model once per worker and keep it resident for every chunk task.

    Parameters
    ----------
    settings
        Weights, precision, layers and batching of the run's engine.

    Notes
    -----
    On a GPU worker the device is ``cuda:0``: ``LocalCUDACluster`` and ``dask cuda worker``
    give each worker its own GPU through ``CUDA_VISIBLE_DEVICES``. On a CPU worker, Dask sets
    ``OMP_NUM_THREADS=1``; ``settings.torch_threads`` gives torch the worker's share of cores.
    """

    name = PLUGIN_NAME

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings

    async def setup(self, worker) -> None:
        """Build the engine in a thread, so the worker keeps answering the scheduler."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._load)
        except asyncio.CancelledError:
            # The worker is closing (the run was interrupted while the model loaded): not an
            # error of the setup, and Dask would print its traceback as one.
            logger.debug("model load cancelled: the worker is closing")

    def _load(self, report: bool = True) -> object:
        clock = time.perf_counter()
        import torch

        imported = time.perf_counter() - clock
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        key = engine_key(self.settings)
        with _ENGINES_LOCK:
            engine = _ENGINES.get(key)
            if engine is None:
                _ENGINES.clear()  # one model per worker: free the old one's memory first
                engine = _ENGINES[key] = self._build(torch)
                engine.load_detail["import"] += imported
                engine.reported = False
                engine.built_early = not report
            if not report:
                return engine  # the early start: the run's setup reports the load
            if not getattr(engine, "reported", True):
                # Built just now, or by the early start of this worker (start_loading):
                # either way this setup is the one that reports the load.
                engine.reported = True
                _SETUP.update(
                    load_seconds=sum(engine.load_detail.values()),
                    compile_seconds=engine.compile_seconds,
                    reused=False,
                    detail=engine.load_detail,
                    early=engine.built_early,
                )
            elif _should_compile(self.settings.compile, engine):
                _SETUP.update(
                    load_seconds=0.0,
                    compile_seconds=engine.enable_compile(),
                    reused=True,
                    detail={},
                    early=False,
                )
            else:
                _SETUP.update(
                    load_seconds=0.0, compile_seconds=0.0, reused=True, detail={}, early=False
                )
        return engine

    def _build(self, torch):
        """Build the engine; record the seconds of each step in ``engine.load_detail``."""
        clock = time.perf_counter()
        detail = {}

        def step(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            detail[name] = detail.get(name, 0.0) + now - clock
            clock = now

        _read_ahead(self.settings.weights)
        import esm  # noqa: F401  (fair-esm's import is part of the load; timed apart)

        from virnuc_dask.engine import build_engine, resolve_dtype, torch_dtype
        from virnuc_dask.model.loading import load_model

        step("import")
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.init()
            torch.empty(1, device=device)  # creates the CUDA context
            _use_compile_cache()
        step("device")
        dtype = torch_dtype(resolve_dtype(self.settings.dtype, device))
        model = load_model(self.settings.weights, device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step("weights")
        engine = build_engine(
            model,
            device=device,
            dtype=self.settings.dtype,
            layers=list(self.settings.layers),
            max_residues=self.settings.max_residues,
            tokens_per_batch=self.settings.tokens_per_batch,
            compile=self.settings.compile,
        )
        engine.compile_seconds = getattr(engine, "compile_seconds", 0.0)
        step("engine")
        detail["engine"] = max(detail["engine"] - engine.compile_seconds, 0.0)
        engine.load_detail = detail
        return engine


def _should_compile(wanted: bool | None, engine) -> bool:
    """Whether a run asking ``wanted`` compiles the worker's built engine now.

    ``None`` (a large run) leaves it to the engine's default: a GPU engine without the fused
    kernels compiles. The reference engine never compiles.
    """
    if getattr(engine, "compiled", True):
        return False
    return engine.compiles_by_default if wanted is None else wanted


def _read_ahead(weights) -> None:
    """Ask the kernel to start reading the checkpoint while torch and fair-esm import.

    A no-op when the file is already in the page cache (every run after the first on a node).
    """
    if weights.checkpoint is None or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(weights.checkpoint, os.O_RDONLY)
    except OSError:
        return  # load_model names the missing file
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def start_loading(settings: EngineSettings) -> threading.Thread:
    """Start building this worker's engine in a background thread, and return the thread.

    A local cluster's workers call this as they start (:func:`early_load_preload`), so the
    model loads while the worker registers and the driver connects, instead of after. The
    run's :class:`ModelPlugin` then finds the engine built, or waits for the build to finish
    (both hold the engine lock). A failure here is only logged: the plugin builds again and
    reports the error as it would have.
    """

    def load() -> None:
        try:
            ModelPlugin(settings)._load(report=False)
        except BaseException as error:  # noqa: BLE001 (the plugin raises it properly)
            logger.debug("early model load failed (%s); the run's setup retries", error)

    thread = threading.Thread(target=load, name="virnuc-dask-early-load", daemon=True)
    thread.start()
    return thread


def early_load_preload(settings: EngineSettings) -> str:
    """A Dask worker preload that starts loading ``settings`` as the worker starts.

    The preload is the text of a module (Dask accepts that in its ``preload`` list) rather
    than a module taking an argument: dask-cuda gives every preload of its workers its own
    ``--create-cuda-context`` argument.
    """
    return (
        "from virnuc_dask.worker import EngineSettings, ignore_interrupts, start_loading\n\n\n"
        "def dask_setup(worker):\n"
        "    ignore_interrupts()\n"
        f"    start_loading(EngineSettings.from_json({settings.to_json()!r}))\n"
    )


def ignore_interrupts() -> None:
    """Let a local cluster's worker process ignore Ctrl-C: the driver that started it ends it.

    A terminal sends Ctrl-C's SIGINT to every process of its foreground group, the worker
    processes included; a worker that took it would die in the middle of the driver's orderly
    shutdown, printing tracebacks over the one line that says what was kept. (A worker still
    importing Python's modules, before its preload, can still take it: a second or so.)
    The warning Dask logs for each task cancelled while it ran is dropped too.
    """
    with contextlib.suppress(ValueError):  # not the main thread: nothing to change
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The warning for a task cancelled while it ran: what an interrupted run does to them.
    logging.getLogger("distributed.worker.state_machine").addFilter(
        lambda record: "<Task cancelled" not in record.getMessage()
    )


def engine_key(settings: EngineSettings) -> EngineSettings:
    """What decides whether a worker's engine can serve ``settings`` without a reload.

    Compiling is not part of it: an eager engine is compiled in place when a run asks for it,
    and a compiled one serves a run that would not have compiled. Threads are set per task.
    """
    return dataclasses.replace(settings, compile=None, torch_threads=None)


def setup_stats() -> dict:
    """What this worker's last plugin setup did: seconds loading and compiling, reuse.

    ``detail`` splits the load into ``import`` (torch and fair-esm in a fresh worker),
    ``device`` (the CUDA context), ``weights`` (checkpoint to device) and ``engine``;
    ``early`` says whether the load began as the worker started (:func:`start_loading`).
    """
    return dict(_SETUP)


def _use_compile_cache() -> None:
    """Keep torch's and Triton's compile caches in the per-user cache folder.

    So a new process reuses the kernels an earlier one compiled. torch's default is a folder
    under the system's temporary directory, which many machines clear at boot; Triton's is in
    the home folder. An explicit ``TORCHINDUCTOR_CACHE_DIR`` or ``TRITON_CACHE_DIR`` is left
    as it is.
    """
    from virnuc_dask.model.weights import digest_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(digest_cache_dir() / "torchinductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(digest_cache_dir() / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def worker_engine(settings: EngineSettings):
    """Return this worker's engine for ``settings``, loading it if the plugin has not."""
    # A worker that restarted between the plugin's setup and this task loads here.
    return ModelPlugin(settings)._load()


@dataclass(frozen=True)
class ChunkJob:
    """Everything a chunk task needs besides its chunk: paths and the run's identity.

    Attributes
    ----------
    index_dir, order_path, shard_dir
        The saved index, the partition's order and the shard folder, in the work directory.
    fingerprint
        The run's fingerprint, stored in every shard.
    output_dtype
        Stored precision of the shards.
    engine
        What the worker's engine is built from.
    lock_path, token
        The work directory's lock and the run's token: shards are written only while the
        lock holds this token.
    width
        Features per layer (the model's width), checked when reusing a shard.
    chunk_seconds
        Time limit of a chunk; None: automatic (:func:`time_limit`); 0: none.
    storage
        fsspec options for the URLs among these paths and the inputs (hidden in logs).
    per_residue, residue_dtype
        Also write every residue's rows into the shard, in this dtype.
    long
        How sequences longer than the engine's ``max_residues`` are embedded.
    """

    index_dir: str
    order_path: str
    shard_dir: str
    fingerprint: str
    output_dtype: str
    engine: EngineSettings
    lock_path: str = ""
    token: str = ""
    width: int | None = None
    chunk_seconds: float | None = None
    storage: StorageOptions | None = None
    per_residue: bool = False
    residue_dtype: str = "float16"
    long: str = "truncate"


#: Runs whose index a worker keeps on its disk (a work directory at a URL): the oldest go.
KEEP_RUNS = 4


def _local_copy(job: ChunkJob) -> tuple[str, str]:
    """The saved index and partition of a work directory at a URL, on this worker's disk.

    Downloaded once per run (the folder is named by the run's token) into the worker's Dask
    local directory, under a temporary name renamed when complete, so that concurrent tasks
    of the worker never read a half-copied index; copies of older runs are removed.
    """
    try:
        base = Path(get_worker().local_directory) / "virnuc-dask-runs"
    except ValueError:
        base = Path(tempfile.gettempdir()) / "virnuc-dask-runs"
    folder = base / job.token
    if not (folder / "complete").exists():
        partial = base / f".{job.token}.{uuid.uuid4().hex}.partial"
        try:
            download_folder(Remote(job.index_dir, job.storage), partial / "index")
            Remote(job.order_path, job.storage).get(partial / "order.npy")
            (partial / "complete").touch()
            os.rename(partial, folder)
        except OSError:
            if not (folder / "complete").exists():
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        runs = sorted(base.iterdir(), key=lambda p: p.stat().st_mtime)
        for old in [p for p in runs if not p.name.startswith(".")][:-KEEP_RUNS]:
            shutil.rmtree(old, ignore_errors=True)  # mapped files stay readable (POSIX)
    return str(folder / "index"), str(folder / "order.npy")


def time_limit(tokens: int, given: float | None, rate: float | None) -> float | None:
    """Seconds a chunk of ``tokens`` may take before its worker is ended; None for no limit.

    ``given`` wins when set (0 means no limit). Otherwise the limit is :data:`SLACK` times the
    chunk's time at ``rate`` tokens per second, at least :data:`MIN_CHUNK_SECONDS`.
    """
    if given is not None:
        return float(given) if given > 0 else None
    return max(MIN_CHUNK_SECONDS, SLACK * tokens / rate)


def assumed_rate(parameters: int, device: str, threads: int = 1) -> float:
    """Tokens per second assumed of a model before this worker has measured it.

    A forward pass costs about two operations per parameter and token; the device's speed is
    the low :data:`ASSUMED_FLOPS` (per thread on a CPU).
    """
    flops = ASSUMED_FLOPS.get(device, ASSUMED_FLOPS["cpu"])
    return flops * (max(1, threads) if device == "cpu" else 1) / (2 * max(1, parameters))


def remembered_rate(settings: EngineSettings) -> float | None:
    """The slowest speed (tokens/s) a chunk of this engine has run at in this worker process."""
    return _SLOWEST_RATES.get(engine_key(settings))


class _Watchdog:
    """Ends this worker process if a chunk runs past its time limit.

    A hung CUDA call or a deadlock cannot be interrupted from Python; ending the process is the
    one remedy that always works, and Dask's nanny starts a fresh worker in its place.

    The automatic limit follows the chunk (:meth:`batch`): the first batch's speed sets a
    limit of :func:`time_limit` at that speed (it replaces a limit from an assumed speed,
    and only lengthens one from a measured speed), and a later batch lengthens the limit
    when the chunk's speed so far asks for more. A chunk that makes progress is never ended
    for being slower than expected; one whose batches stop coming is.

    Parameters
    ----------
    number
        The chunk's number, for the message.
    tokens
        The chunk's tokens.
    seconds
        The starting limit; None: no limit.
    measured
        Whether ``seconds`` comes from a speed this worker measured (else an assumed one).
    adjust
        Whether batches adjust the limit (False for a limit the user gave).
    on_expire
        Called with ``number`` when the limit passes; default: end this process.
    """

    def __init__(
        self,
        number: int,
        tokens: int,
        seconds: float | None,
        *,
        measured: bool,
        adjust: bool = True,
        on_expire=None,
    ) -> None:
        self.number, self.tokens, self.seconds = number, tokens, seconds
        self.measured, self.adjust = measured, adjust and seconds is not None
        self.on_expire = on_expire or self._end_process
        self.started = time.monotonic()
        self.batches = 0
        self.done_tokens = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="virnuc-dask-watchdog")
        self._thread.daemon = True

    def batch(self, tokens: int) -> None:
        """A batch of ``tokens`` finished: adjust the limit to the chunk's speed so far."""
        with self._lock:
            self.batches += 1
            self.done_tokens += tokens
            if not self.adjust:
                return
            elapsed = max(time.monotonic() - self.started, 1e-3)
            needed = time_limit(self.tokens, None, self.done_tokens / elapsed)
            if self.batches == 1 and not self.measured:
                self.seconds = needed
            else:
                self.seconds = max(self.seconds, needed)

    def _watch(self) -> None:
        while True:
            with self._lock:
                left = self.started + self.seconds - time.monotonic()
            if left <= 0:
                break
            if self._stop.wait(min(left, 5.0)):
                return
        logger.error(
            "chunk %d has run past its time limit of %.0f s: ending this worker so that the "
            "chunk is given to a fresh one",
            self.number,
            self.seconds,
        )
        self.on_expire(self.number)

    @staticmethod
    def _end_process(number: int) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def __enter__(self) -> _Watchdog:
        self.started = time.monotonic()
        if self.seconds is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


def embed_chunk(chunk: Chunk, job: ChunkJob) -> ShardInfo:
    """Embed one chunk on this worker and write its shard; the body of every Dask task.

    Parameters
    ----------
    chunk
        The positions of the partition's order this task covers.
    job
        Paths and settings shared by all chunks of the run.

    Returns
    -------
    ShardInfo
        The shard's path and counts, for the assembly step.
    """
    import torch

    from virnuc_dask.inputs import FastaIndex, read_sequences
    from virnuc_dask.output.remote import put_shard, shard_source

    started = time.perf_counter()
    path = shard_path(job.shard_dir, chunk)
    remote = is_url(path)
    index_dir, order_path = _local_copy(job) if remote else (job.index_dir, job.order_path)
    rows = np.array(np.load(order_path, mmap_mode="r")[chunk.start : chunk.stop])
    worker = _worker_address()
    exists = Remote(path, job.storage).is_file() if remote else os.path.exists(path)
    if exists and shard_matches(
        shard_source(path, job.storage),
        job.fingerprint,
        rows,
        layers=list(job.engine.layers),
        width=job.width,
        dtype=job.output_dtype,
    ):
        return ShardInfo(chunk.number, path, chunk.size, chunk.tokens, "existing", 0.0)
    engine = worker_engine(job.engine)
    index = FastaIndex.load(index_dir)
    sequences = read_sequences(index, rows, job.storage)
    measured = remembered_rate(job.engine)
    rate = measured or assumed_rate(
        sum(p.numel() for p in engine.model.parameters()),
        next(engine.model.parameters()).device.type,
        torch.get_num_threads(),
    )
    watchdog = _Watchdog(
        chunk.number,
        chunk.tokens,
        time_limit(chunk.tokens, job.chunk_seconds, rate),
        measured=measured is not None,
        adjust=job.chunk_seconds is None,
    )
    # A shard at a URL is written on this worker's disk, then put whole.
    local = Path(index_dir).parent / os.path.basename(path) if remote else Path(path)
    residues = None
    if job.per_residue:
        # The residues go into the shard batch by batch: the chunk's rows are never all in
        # this process's memory (a chunk of 3B on 2 M tokens would be 10 GB in float16).
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        residues = ShardResidues(
            partial_name(local),
            embedded_residues(lengths, job.engine.max_residues, job.long),
            layers=len(job.engine.layers),
            width=engine.model.embed_dim,
            dtype=job.residue_dtype,
        )
    try:
        try:
            # Grad mode is thread-local and Dask runs tasks in its own threads: set it here.
            with watchdog, torch.inference_mode():
                computing = time.perf_counter()
                embedding = engine.embed(
                    sequences,
                    on_batch=_on_batch(watchdog, _batch_reporter(job.token, chunk)),
                    long=job.long,
                    on_residues=residues.write if residues is not None else None,
                    residue_dtype=job.residue_dtype,
                )
        except Exception as error:
            ids = index.ids(rows[:5])
            more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
            raise ChunkError(
                f"chunk {chunk.number} ({len(rows)} sequences: {', '.join(ids)}{more}) failed: "
                f"{type(error).__name__}: {error}"
            ) from error
        rate = chunk.tokens / max(time.perf_counter() - computing, 1e-3)
        key = engine_key(job.engine)
        _SLOWEST_RATES[key] = min(rate, _SLOWEST_RATES.get(key, rate))
        if job.lock_path and not holds(job.lock_path, job.token, job.storage):
            raise RunAbandoned(
                f"chunk {chunk.number}: the run that asked for it no longer holds "
                f"{job.lock_path}; its result is discarded"
            )
        if residues is not None:
            residues.close()
        write_shard(
            local,
            rows=rows,
            ids=index.ids(rows),
            embedding=embedding,
            fingerprint=job.fingerprint,
            dtype=job.output_dtype,
            layers=list(job.engine.layers),
            partial=residues.path if residues is not None else None,
        )
    finally:
        if residues is not None:
            residues.discard()  # a no-op once write_shard renamed it
    if remote:
        try:
            put_shard(local, path, job.storage)
        finally:
            os.unlink(local)
    return ShardInfo(
        chunk.number, path, chunk.size, chunk.tokens, worker, time.perf_counter() - started
    )


def _on_batch(watchdog: _Watchdog, reporter: BatchReporter | None):
    """The engine's ``on_batch``: the watchdog follows the chunk, the driver hears of it."""

    def on_batch(tokens: int) -> None:
        watchdog.batch(tokens)
        if reporter is not None:
            reporter(tokens)

    return on_batch


def _batch_reporter(token: str, chunk: Chunk) -> BatchReporter | None:
    """The callback that tells the run's driver how far a chunk is (None outside a worker)."""
    try:
        worker = get_worker()
    except ValueError:
        return None
    return BatchReporter(worker.log_event, token, chunk.number)


def _worker_address() -> str:
    try:
        return get_worker().address
    except ValueError:
        return "local"
