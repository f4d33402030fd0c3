"""The cluster recipe of ``docs/cluster.md``, run as written there, on localhost processes.

The commands of the document's "Try it on one machine" block run in a folder laid out like the
repository, with two changes only: the system chooses the ports (8786 and 8787 may be taken on
the machine that runs the tests), and ``dask`` and ``virnuc-dask`` are this environment's.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import virnuc_dask
from tests.helpers import EXAMPLE, processes, scheduler_address

DOC = Path(__file__).resolve().parents[2] / "docs" / "cluster.md"


def recipe() -> list[list[str]]:
    """The commands of the document's block for one machine, one list of words each."""
    section = DOC.read_text().split("## Try it on one machine", 1)[1].split("\n## ", 1)[0]
    blocks = [part.split("```", 1)[0] for part in section.split("```bash\n")[1:]]
    lines = [line for block in blocks for line in block.splitlines() if line.strip()]
    return [shlex.split(line.removesuffix("&")) for line in lines]


def test_the_recipe_for_one_machine_runs_as_written(tmp_path):
    scheduler, worker, run = recipe()
    assert scheduler[:2] == ["dask", "scheduler"] and worker[:2] == ["dask", "worker"]
    assert run[:2] == ["virnuc-dask", "embed"] and "--scheduler-file" in run
    programs = Path(sys.executable).parent
    (tmp_path / "examples" / "data").mkdir(parents=True)
    shutil.copy(EXAMPLE, tmp_path / "examples" / "data")
    scheduler = [
        str(programs / "dask"),
        *scheduler[1:],
        *("--port", "0", "--dashboard-address", "127.0.0.1:0"),
    ]
    worker = [str(programs / "dask"), *worker[1:]]
    scheduler_file = tmp_path / scheduler[scheduler.index("--scheduler-file") + 1]
    with processes(scheduler, worker, cwd=tmp_path):
        scheduler_address(scheduler_file)
        result = subprocess.run(
            [str(programs / "virnuc-dask"), *run[1:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        # The dashboard works with what the install brings (bokeh is a dependency).
        port = json.loads(scheduler_file.read_text())["services"]["dashboard"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=30) as page:
            status, body = page.status, page.read().decode()
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"http://127.0.0.1:{port}/status" in result.stdout + result.stderr  # the link
    assert status == 200 and "bokeh" in body and "needs bokeh" not in body
    output = tmp_path / run[run.index("-o") + 1]
    ids = [line[1:].split()[0] for line in EXAMPLE.read_text().splitlines() if line[:1] == ">"]
    with virnuc_dask.open_embeddings(output) as ds:
        assert list(ds.sequence.values) == ids
        assert ds.attrs["random_weights"] == "yes" and ds.attrs["model"] == "esm2_t2_tiny"
    assert not output.with_name(output.name + ".work").exists()
