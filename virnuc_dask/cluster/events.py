"""Batch reports: how far each chunk is, from the workers to the run's driver.

Workers report each finished batch of a chunk through Dask's own event log (a topic on the
scheduler, :data:`TOPIC`), so the count moves within a chunk, not only when chunks finish. The
driver listens with :func:`listen` while its run computes.

Decisions:

- One topic for every run, with the run's token in each message: the scheduler keeps a
  bounded log per topic, and a long-lived shared scheduler would otherwise keep one per run.
  A client has one handler per topic, so :func:`listen` keeps one subscription per client and
  hands each message to the run it names (two runs may share a client).
- A worker sends at most one message per chunk every :data:`REPORT_SECONDS`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

#: The scheduler event topic of batch progress; messages are ``{"run", "chunk", "tokens"}``.
TOPIC = "virnuc-dask-progress"


#: Seconds between two progress messages of one chunk.
REPORT_SECONDS = 0.5


_LISTENERS: dict[int, dict[str, Callable[[dict], None]]] = {}


_LISTENERS_LOCK = threading.Lock()


def listen(client, run: str, callback: Callable[[dict], None]) -> None:
    """Call ``callback(message)`` for every progress message of ``run`` that ``client`` gets."""
    with _LISTENERS_LOCK:
        runs = _LISTENERS.setdefault(id(client), {})
        first = not runs
        runs[run] = callback
    if first:
        client.subscribe_topic(TOPIC, _dispatcher(id(client)))


def stop_listening(client, run: str) -> None:
    """Stop handing ``run``'s messages on; unsubscribe the client after its last run."""
    with _LISTENERS_LOCK:
        runs = _LISTENERS.get(id(client), {})
        runs.pop(run, None)
        last = not runs
        if last:
            _LISTENERS.pop(id(client), None)
    if last:
        # A closed client has nothing left to unsubscribe.
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(TOPIC)


def _dispatcher(client_id: int) -> Callable[[tuple], None]:
    def dispatch(event: tuple) -> None:
        _, message = event
        with _LISTENERS_LOCK:
            callback = _LISTENERS.get(client_id, {}).get(message.get("run"))
        if callback is not None:
            callback(message)

    return dispatch


class BatchReporter:
    """A worker's ``on_batch`` callback: sends the tokens of a chunk done so far, throttled.

    Parameters
    ----------
    log_event
        The worker's ``log_event`` (thread-safe in Dask).
    run, chunk
        The run's token and the chunk's number.
    """

    def __init__(self, log_event: Callable[[str, dict], None], run: str, chunk: int) -> None:
        self.log_event, self.run, self.chunk = log_event, run, chunk
        self.tokens = 0
        self.last = time.monotonic()

    def __call__(self, tokens: int) -> None:
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last >= REPORT_SECONDS:
            self.last = now
            self.log_event(TOPIC, {"run": self.run, "chunk": self.chunk, "tokens": self.tokens})
