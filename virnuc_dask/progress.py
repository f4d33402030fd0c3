"""Progress of a run in the terminal: chunks and tokens done, rate and time left.

On a terminal (a TTY) it is one line rewritten in place; when the output goes to a file or a
pipe it is a plain line every ``every`` seconds, so a log stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class TextProgress:
    """Report chunks and tokens done against the run's totals.

    Parameters
    ----------
    chunks, tokens
        Totals of the run (reused chunks included).
    stream
        Where to write; default standard error.
    every
        Seconds between plain lines when ``stream`` is not a terminal.
    """

    def __init__(
        self, chunks: int, tokens: int, stream: TextIO | None = None, every: float = 30.0
    ) -> None:
        self.chunks, self.tokens = chunks, tokens
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self.started = time.monotonic()
        self.last = 0.0
        self.first_tokens: int | None = None

    def update(self, chunks_done: int, tokens_done: int, *, final: bool = False) -> None:
        """Show the state; on a non-terminal stream only every ``every`` seconds (or final)."""
        now = time.monotonic()
        if self.first_tokens is None:
            self.first_tokens = tokens_done  # reused chunks do not count towards the rate
        if not final and now - self.last < (0.5 if self.tty else self.every):
            return
        self.last = now
        elapsed = now - self.started
        rate = (tokens_done - self.first_tokens) / elapsed if elapsed > 0 else 0.0
        left = (self.tokens - tokens_done) / rate if rate > 0 else float("nan")
        eta = f"{left:,.0f} s left" if left == left else "time left unknown"
        line = (
            f"{chunks_done}/{self.chunks} chunks, {tokens_done:,}/{self.tokens:,} tokens "
            f"({100 * tokens_done / max(self.tokens, 1):.0f}%), {rate:,.0f} tokens/s, {eta}"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
