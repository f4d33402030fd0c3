"""The time limit of a chunk, and the watchdog that ends a worker whose chunk runs past it.

Decisions:

- Each chunk has a time limit (:func:`time_limit`): :data:`SLACK` times its expected time at
  the slowest speed this worker has measured for the same engine, or, before any, at a speed
  assumed of the device (:func:`assumed_rate`, far below the real one); the chunk's first
  batch then sets the limit its own speed asks for, and later batches only lengthen it
  (:class:`_Watchdog`). A restarted worker starts from the assumed speed again, which never
  ends a healthy chunk. A chunk past its limit ends its worker process
  (a hung GPU call or a deadlock cannot be interrupted from Python): the nanny starts a new
  worker and the scheduler gives the chunk to a worker again, up to Dask's
  ``distributed.scheduler.allowed-failures`` times; then the run stops naming the chunk.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

logger = logging.getLogger(__name__)


#: The time limit is this many times the chunk's expected time.
SLACK = 10.0


#: No chunk is given less than this.
MIN_CHUNK_SECONDS = 120.0


#: Floating-point operations per second assumed of a device before this worker has measured
#: its engine: far below what they do (a 2-core CPU runs ESM-2 150M in fp32 at about 10
#: GFLOP/s a thread, an H200 runs 3B in bf16 at about 600 TFLOP/s), so that the limit of a
#: healthy first chunk is never too short. A CPU's figure is per torch thread.
ASSUMED_FLOPS = {"cpu": 1e9, "cuda": 20e12}


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
