"""One function of a benchmark in a fresh process that answers one line of JSON.

Decisions:

- What imports torch or holds a GPU (writing checkpoints, timing the engine, a notebook's
  resident cluster) runs in a child process, so the process that starts the jobs holds no GPU
  and every measurement starts as a user's fresh process does.
- The child is named by the function itself, ``child(child_engine, env, ...)``: it imports the
  function's module by name from ``benchmarks/`` (a script run as ``__main__`` by its file's
  name) and calls it with the keyword arguments, passed as JSON. Only functions named
  ``child_*`` are served, so a typo cannot run arbitrary code of a module.
- A failed child does not stop the benchmark: its answer is ``{"error": last line}`` and the
  tail of its standard error is printed; the caller decides whether that ends the run.
"""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent
# The child puts benchmarks/ first on its path, as running a script there does.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from common.children import serve; serve(sys.argv[2:])"
)


def child(function: Callable[..., dict], env: dict, timeout: float | None, **kwargs) -> dict:
    """Run ``function(**kwargs)`` in a fresh process; return its JSON answer.

    Parameters
    ----------
    function
        A ``child_*`` function of a module in ``benchmarks/`` that returns a JSON-able dict.
    env
        The child's environment.
    timeout
        Seconds before the child is given up (None: no limit).
    **kwargs
        JSON-able keyword arguments of ``function``.

    Returns
    -------
    dict
        The function's answer, or ``{"error": ...}`` when the child failed or timed out.
    """
    module = function.__module__
    if module == "__main__":
        module = Path(inspect.getfile(function)).stem
    name = function.__name__
    command = [sys.executable, "-c", _BOOT, str(BENCHMARKS), module, name, json.dumps(kwargs)]
    kind = name.removeprefix("child_")
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{kind} timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"  {kind} failed (exit {done.returncode}):\n{tail(done.stderr)}", flush=True)
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def serve(argv: list[str]) -> None:
    """The child's side: import ``argv[0]``, call its ``argv[1]`` with ``argv[2]`` (JSON).

    Parameters
    ----------
    argv
        Module name, function name and the keyword arguments as a JSON object.
    """
    module, name, kwargs = argv
    if not name.startswith("child_"):
        raise SystemExit(f"{name}: only child_* functions run in a child process")
    function = getattr(importlib.import_module(module), name)
    print(json.dumps(function(**json.loads(kwargs))), flush=True)


def tail(text: str, lines: int = 15) -> str:
    """The last ``lines`` lines of ``text``, indented under the line that reports a failure."""
    return "\n".join("      " + line for line in text.strip().splitlines()[-lines:])
