"""The one exception type for errors a user can cause and fix, and how messages name options.

A message that tells the user what to pass names the option the way the caller spells it:
``--resume`` on the command line, ``resume=True`` from Python. The command line sets
:data:`SPELLING` for the duration of a command; everything else gets the Python spelling.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator


class VirnucError(Exception):
    """A problem with the user's input, files or settings, with a message that says the fix.

    The command line prints the message without a traceback and exits with status 2.
    Programming errors are never wrapped in this type.
    """


class Interrupted(KeyboardInterrupt):
    """A run ended by Ctrl-C (or SIGTERM), saying what it kept for ``resume``.

    Attributes
    ----------
    kept
        The work directory whose finished chunks remain, or None when nothing was kept.
    chunks
        How many finished chunks it holds.
    """

    def __init__(self, kept=None, chunks: int = 0) -> None:
        super().__init__()
        self.kept, self.chunks = kept, chunks

    def __str__(self) -> str:
        if self.kept is None:
            return "interrupted; nothing was finished, so nothing is kept"
        return (
            f"interrupted; {self.chunks} finished chunk{'s' if self.chunks != 1 else ''} "
            f"kept in {self.kept}: rerun with {option('resume')} to reuse them"
        )


#: ``"python"`` (default) or ``"cli"``: how :func:`option` spells an option in messages.
SPELLING: contextvars.ContextVar[str] = contextvars.ContextVar("spelling", default="python")


def option(name: str, value: object = True) -> str:
    """Spell option ``name`` (a Python argument name) with ``value`` for the current caller.

    >>> option("resume")
    'resume=True'
    >>> option("work_dir", "DIR")
    'work_dir=DIR'
    """
    if SPELLING.get() == "cli":
        flag = "--" + name.replace("_", "-")
        return flag if value is True else f"{flag} {value}"
    return f"{name}={value}"


@contextlib.contextmanager
def command_line_spelling() -> Iterator[None]:
    """Within this block, :func:`option` spells options as command-line flags."""
    token = SPELLING.set("cli")
    try:
        yield
    finally:
        SPELLING.reset(token)
