"""The model stays resident on each worker: the worker plugin that builds and keeps the engine.

:class:`ModelPlugin` is a ``distributed.WorkerPlugin``: registered once per run, it builds the
engine on every worker (and on workers that join later), off the event loop so heartbeats go
on while a 3B model loads. The model never travels through the scheduler: the plugin carries
only the description of the weights (:class:`EngineSettings`). A local cluster's workers start
loading as they start (:func:`early_load_preload`); the run's plugin then finds the engine.

Decisions:

- One engine per worker, reused by a later run of the same model and settings
  (:func:`engine_key`: compiling and threads aside), replaced by a run of another. Plain
  ``dask worker`` runs several task threads: a lock makes sure one engine is built at a time.
- Compiling follows :mod:`virnuc_dask.engine.compiling`; a built eager engine is compiled in
  place when a later run asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

from distributed import WorkerPlugin, get_worker

from virnuc_dask.engine.compiling import compiles_now
from virnuc_dask.model.weights import WeightsSource

logger = logging.getLogger(__name__)


PLUGIN_NAME = "virnuc-dask-model"
#: The key of a worker's :class:`WorkerEngines` in its ``extensions``.
STATE_NAME = "virnuc-dask-engines"
#: What a setup that found its engine ready reports.
_REUSED = {
    "load_seconds": 0.0,
    "compile_seconds": 0.0,
    "reused": True,
    "detail": {},
    "early": False,
}


@dataclass
class WorkerEngines:
    """One worker's engine state, kept on the worker (:func:`state_of`).

    Attributes
    ----------
    engines
        The resident engine, by :func:`engine_key`: reused when a later run on the same
        cluster asks for the same model and settings, replaced when it asks for another.
    lock
        Held while an engine is built or chosen: plain ``dask worker`` runs several task
        threads, and one engine is built at a time.
    setup
        What this worker's last plugin setup did (for the run report's phases).
    slowest_rates
        The slowest tokens per second a chunk of each engine has run at on this worker, by
        :func:`engine_key` (time limits): a speed of the 8M model says nothing of the 3B.
    """

    engines: dict = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    setup: dict = dataclasses.field(default_factory=lambda: dict(_REUSED))
    slowest_rates: dict = dataclasses.field(default_factory=dict)

    def remember_rate(self, settings: EngineSettings, rate: float) -> None:
        """Keep ``rate`` (tokens/s of a finished chunk) when it is the slowest seen."""
        key = engine_key(settings)
        self.slowest_rates[key] = min(rate, self.slowest_rates.get(key, rate))

    def remembered_rate(self, settings: EngineSettings) -> float | None:
        """The slowest speed (tokens/s) a chunk of this engine has run at on this worker."""
        return self.slowest_rates.get(engine_key(settings))


#: The state of a process that is not a Dask worker (a test or a benchmark calling tasks).
_OUTSIDE_A_WORKER = WorkerEngines()


def state_of(worker=None) -> WorkerEngines:
    """The engine state of ``worker`` (default: the worker running this task), made on first use.

    Kept in the worker's ``extensions``, so each worker of an in-process cluster (several
    workers in one process) has its own engine; outside any worker, one state of the process.
    """
    if worker is None:
        try:
            worker = get_worker()
        except ValueError:
            return _OUTSIDE_A_WORKER
    return worker.extensions.setdefault(STATE_NAME, WorkerEngines())


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
            state = state_of(worker)
            await asyncio.get_running_loop().run_in_executor(None, self._load, state)
        except asyncio.CancelledError:
            # The worker is closing (the run was interrupted while the model loaded): not an
            # error of the setup, and Dask would print its traceback as one.
            logger.debug("model load cancelled: the worker is closing")

    def _load(self, state: WorkerEngines, report: bool = True) -> object:
        """The engine of these settings in ``state``, built if it is not; record the setup."""
        clock = time.perf_counter()
        import torch

        imported = time.perf_counter() - clock
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        key = engine_key(self.settings)
        with state.lock:
            engine = state.engines.get(key)
            if engine is None:
                state.engines.clear()  # one model per worker: free the old one's memory first
                engine = state.engines[key] = self._build(torch)
                engine.load_detail["import"] += imported
                engine.reported = False
                engine.built_early = not report
            if not report:
                return engine  # the early start: the run's setup reports the load
            if not getattr(engine, "reported", True):
                # Built just now, or by the early start of this worker (start_loading):
                # either way this setup is the one that reports the load.
                engine.reported = True
                state.setup = dict(
                    load_seconds=sum(engine.load_detail.values()),
                    compile_seconds=engine.compile_seconds,
                    reused=False,
                    detail=engine.load_detail,
                    early=engine.built_early,
                )
            elif compiles_now(self.settings.compile, engine):
                state.setup = dict(_REUSED, compile_seconds=engine.enable_compile())
            else:
                state.setup = dict(_REUSED)
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


def start_loading(settings: EngineSettings, worker=None) -> threading.Thread:
    """Start building this worker's engine in a background thread, and return the thread.

    A local cluster's workers call this as they start (:func:`early_load_preload`), so the
    model loads while the worker registers and the driver connects, instead of after. The
    run's :class:`ModelPlugin` then finds the engine built, or waits for the build to finish
    (both hold the engine lock). A failure here is only logged: the plugin builds again and
    reports the error as it would have. ``worker``: the starting worker (its preload's).
    """
    state = state_of(worker)

    def load() -> None:
        try:
            ModelPlugin(settings)._load(state, report=False)
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
        "from virnuc_dask.cluster.plugin import EngineSettings, ignore_interrupts\n"
        "from virnuc_dask.cluster.plugin import start_loading\n\n\n"
        "def dask_setup(worker):\n"
        "    ignore_interrupts()\n"
        f"    start_loading(EngineSettings.from_json({settings.to_json()!r}), worker)\n"
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


def setup_stats(dask_worker=None) -> dict:
    """What this worker's last plugin setup did: seconds loading and compiling, reuse.

    ``detail`` splits the load into ``import`` (torch and fair-esm in a fresh worker),
    ``device`` (the CUDA context), ``weights`` (checkpoint to device) and ``engine``;
    ``early`` says whether the load began as the worker started (:func:`start_loading`).
    ``Client.run`` passes ``dask_worker``; inside a task the worker running it is found.
    """
    return dict(state_of(dask_worker).setup)


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


def worker_engine(settings: EngineSettings, state: WorkerEngines | None = None):
    """Return this worker's engine for ``settings``, loading it if the plugin has not."""
    # A worker that restarted between the plugin's setup and this task loads here.
    return ModelPlugin(settings)._load(state or state_of())
