"""``python -m virnuc_dask`` is the ``virnuc-dask`` command: same help, same usage errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: The console script ``pip install`` put beside this interpreter.
COMMAND = str(Path(sys.executable).with_name("virnuc-dask"))
MODULE = [sys.executable, "-m", "virnuc_dask"]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_help_is_the_commands_help():
    for args in (["--help"], ["embed", "--help"]):
        module, command = _run([*MODULE, *args]), _run([COMMAND, *args])
        assert module.returncode == command.returncode == 0, module.stderr[-2000:]
        assert module.stdout == command.stdout
        assert module.stdout.startswith("Usage: virnuc-dask ")


def test_a_usage_error_exits_2_with_the_commands_message(tmp_path):
    for args in (["embed"], ["embed", str(tmp_path / "in.fa"), "-o", "x.h5", "--dtype", "fp64"]):
        module, command = _run([*MODULE, *args]), _run([COMMAND, *args])
        assert module.returncode == command.returncode == 2, module.stderr[-2000:]
        assert module.stderr == command.stderr
        assert module.stderr.startswith("Usage: virnuc-dask embed ")
