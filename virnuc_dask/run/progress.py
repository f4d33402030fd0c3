"""Progress of a run: tokens done, rate and time left, in a terminal or a Jupyter notebook.

- On a terminal (a TTY) the state is one line rewritten in place; when the output goes to a
  file or a pipe it is a plain line every ``every`` seconds, so a log stays readable.
- In a Jupyter kernel it is an HTML progress bar displayed once and updated in place, with
  the dashboard link above it.
- The counts come from the workers' batch reports (:mod:`virnuc_dask.cluster.events`).

Decisions:

- One rate for a run (:func:`rate`), on the progress line and in the run's summary: the
  tokens this run embedded (chunks reused from an earlier run not counted) over the seconds
  since the run started, the model's load included. The final progress line is drawn with
  the summary's seconds, so the two state the same number.
- The first state is always shown (the clock of the last line starts unset, not at 0:
  ``time.monotonic()`` counts from boot, so on a machine booted minutes ago a 0 would look
  recent); the counts shown never exceed the totals (overlapping windows, or a chunk
  computed again after a lost worker, can report more tokens than the chunk's).
"""

from __future__ import annotations

import html
import re
import sys
import time
from typing import TextIO


def rate(tokens: int, seconds: float) -> float:
    """Tokens per second of a run: ``tokens`` it embedded (reuse excluded) in ``seconds``."""
    return tokens / seconds if seconds > 0 else 0.0


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (where HTML can be displayed)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def make_progress(chunks: int, tokens: int, dashboard: str | None = None):
    """The progress display that fits this process: a notebook's, or the terminal's."""
    if in_notebook():
        return NotebookProgress(chunks, tokens, dashboard)
    return TextProgress(chunks, tokens, dashboard=dashboard)


class _Progress:
    """Totals, and the rate and time left of what is done."""

    def __init__(self, chunks: int, tokens: int, interval: float) -> None:
        self.chunks, self.tokens = chunks, tokens
        self.interval = interval
        self.started = time.monotonic()
        self.last: float | None = None  # no line shown yet
        self.note: str | None = None  # the note of the last line shown
        self.first_tokens: int | None = None

    def update(
        self,
        chunks_done: int,
        tokens_done: int,
        *,
        final: bool = False,
        seconds: float | None = None,
        note: str | None = None,
    ) -> None:
        """Show the state, at most every ``interval`` seconds (always when ``final``).

        ``seconds`` is the run's time so far when the caller measured it (the final line
        takes the summary's); by default, the time since this display started. ``note`` ends
        the line (workers pending in a batch queue).
        """
        now = time.monotonic()
        tokens_done = min(tokens_done, self.tokens)
        chunks_done = min(chunks_done, self.chunks)
        if self.first_tokens is None:
            self.first_tokens = tokens_done  # reused chunks do not count towards the rate
        # Workers newly pending, or no longer: said at once (a clock in the note is no news).
        news = _shape(note) != _shape(self.note)
        if not final and not news and self.last is not None and now - self.last < self.interval:
            return
        self.last, self.note = now, note
        speed = rate(
            tokens_done - self.first_tokens, now - self.started if seconds is None else seconds
        )
        left = (self.tokens - tokens_done) / speed if speed > 0 else float("nan")
        eta = f"{left:,.0f} s left" if left == left else "time left unknown"
        line = (
            f"{tokens_done:,}/{self.tokens:,} tokens "
            f"({100 * tokens_done / max(self.tokens, 1):.0f}%), {chunks_done}/{self.chunks} "
            f"chunks, {speed:,.0f} tokens/s, {eta}"
        )
        if note and not final:
            line = f"{line}; {note}"
        self._show(line, tokens_done, final)

    def _show(self, line: str, tokens_done: int, final: bool) -> None:
        raise NotImplementedError


def _shape(note: str | None) -> str | None:
    """A note with its numbers left out: what it says, whatever the count and the clock."""
    return None if note is None else re.sub(r"\d[\d,.]*", "#", note)


class TextProgress(_Progress):
    """Report tokens and chunks done against the run's totals, in a terminal or a log.

    Parameters
    ----------
    chunks, tokens
        Totals of the run (reused chunks included).
    stream
        Where to write; default standard error.
    every
        Seconds between plain lines when ``stream`` is not a terminal.
    dashboard
        The Dask dashboard's address, said once at the start.
    """

    def __init__(
        self,
        chunks: int,
        tokens: int,
        stream: TextIO | None = None,
        every: float = 30.0,
        dashboard: str | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        super().__init__(chunks, tokens, 0.5 if self.tty else every)
        if dashboard:
            self.stream.write(f"Dask dashboard: {dashboard}\n")
            self.stream.flush()

    def _show(self, line: str, tokens_done: int, final: bool) -> None:
        if self.tty:
            # Erased to the end: a shorter line (a note gone) leaves nothing of the last one.
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class NotebookProgress(_Progress):
    """A progress bar in a Jupyter notebook, updated in place; the dashboard link above it.

    Parameters
    ----------
    chunks, tokens
        Totals of the run (reused chunks included).
    dashboard
        The Dask dashboard's address.
    """

    def __init__(self, chunks: int, tokens: int, dashboard: str | None = None) -> None:
        from IPython.display import HTML, display

        super().__init__(chunks, tokens, 0.5)
        self._html = HTML
        self.dashboard = dashboard
        self.handle = display(self._render("starting", 0), display_id=True)

    def _render(self, line: str, tokens_done: int):
        link = (
            f'<div>Dask dashboard: <a href="{html.escape(self.dashboard)}" target="_blank">'
            f"{html.escape(self.dashboard)}</a></div>"
            if self.dashboard
            else ""
        )
        return self._html(
            f'{link}<progress value="{tokens_done}" max="{max(self.tokens, 1)}" '
            f'style="width: 30em"></progress> <span>{html.escape(line)}</span>'
        )

    def _show(self, line: str, tokens_done: int, final: bool) -> None:
        self.handle.update(self._render(line, tokens_done))
