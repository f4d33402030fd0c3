"""The main guard: ``embed()`` at the top level of a script that Dask's workers import again.

Dask starts worker processes with ``spawn``, which imports the main script again; a script
that calls ``embed()`` at top level without ``if __name__ == "__main__":`` would start a run
in every starting worker. The call is refused before anything starts, in one line that names
the script's line, and refused again inside a starting worker.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from virnuc_dask.errors import VirnucError


def _refuse_inside_a_starting_worker() -> None:
    """Refuse ``embed()`` in a worker process that is importing the user's script.

    Dask starts worker processes with the ``spawn`` method, which imports the main script
    again (as ``__mp_main__``). A script that calls ``embed()`` at top level, without
    ``if __name__ == "__main__":``, would start a run inside every starting worker.
    """
    # Under spawn the script is imported as __mp_main__ before the process knows its parent
    # (multiprocessing.parent_process() is still None then): the name alone tells.
    main = sys.modules.get("__main__")
    if getattr(main, "__name__", "") == "__mp_main__":
        raise VirnucError(_GUARD_HINT)


_GUARD_HINT = (
    "embed() was called while a Dask worker process was starting: the script that calls it "
    'has no `if __name__ == "__main__":` guard. Worker processes import the script again; put '
    'the call under `if __name__ == "__main__":`'
)


def _refuse_an_unguarded_script() -> None:
    """Stop a script that calls ``embed()`` at top level without a main guard, in one line.

    Such a script would start a local cluster whose worker processes import it again (Dask
    starts them with ``spawn``) and call ``embed()`` in turn. The call's line is looked up in
    the script's syntax tree before anything starts; the refusal is a ``SystemExit`` whose
    message is all the user sees (an exception would bury it under Dask's tracebacks).
    """
    found = _unguarded_call()
    if found is not None:
        script, line = found
        raise SystemExit(
            f"virnuc-dask: error: {script}, line {line}: embed() is called at the top level of "
            'the script without `if __name__ == "__main__":`; Dask\'s worker processes import '
            'the script again, so put the call under `if __name__ == "__main__":`'
        )


def _unguarded_call() -> tuple[str, int] | None:
    """The main script and the line of its top-level code that leads here, when that line is
    not under ``if __name__ == "__main__":`` (else None)."""
    import ast

    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    frame = next(
        (
            f
            for f in inspect.stack(context=0)
            if f.frame.f_globals is getattr(main, "__dict__", None) and f.function == "<module>"
        ),
        None,
    )
    if not script or frame is None:
        return None  # a notebook, an interactive session or python -c: nothing re-imported
    try:
        tree = ast.parse(Path(script).read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_guard(node.test):
            last = max(getattr(n, "end_lineno", 0) or 0 for n in node.body)
            if node.body[0].lineno <= frame.lineno <= last:
                return None
    return script, frame.lineno


def _is_main_guard(test: object) -> bool:
    """Whether an ``if`` test reads ``__name__ == "__main__"`` (either way round)."""
    import ast

    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    sides = [test.left, *test.comparators]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    texts = [s.value for s in sides if isinstance(s, ast.Constant)]
    return isinstance(test.ops[0], ast.Eq) and names == ["__name__"] and texts == ["__main__"]
