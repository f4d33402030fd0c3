"""The example notebooks, executed top to bottom in a real kernel as a user would run them.

Each notebook runs with its settings as stored (the tiny architecture, random weights, on this
machine's CPU), in a copy of ``examples/`` so that its outputs stay out of the repository. A cell
that raises fails the test; then each notebook's own checks look at what it produced: the files,
the plot, the report. The notebooks are stored without outputs (``nbstripout examples/*.ipynb``).
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import struct
from pathlib import Path

import nbclient
import nbformat
import pytest

import virnuc_dask

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOKS = sorted(path.name for path in EXAMPLES.glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A ``python3`` kernel that runs this interpreter, whatever kernels the machine has."""
    from ipykernel.kernelspec import write_kernel_spec

    folder = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(folder / "kernels" / "python3")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(folder))  # searched before the user's and the system's
        yield "python3"


@pytest.fixture(scope="module")
def executed(kernel, tmp_path_factory) -> dict[str, tuple]:
    """Every notebook run top to bottom, all at once, each in its own kernel and folder.

    Maps each notebook's name to its executed copy, its folder (beside a copy of
    ``examples/data``, where it wrote its files) and the error of a cell that raised, if any.
    At once, because much of a notebook's time is spent waiting for processes to start.
    """
    runs = {}
    for name in NOTEBOOKS:
        folder = tmp_path_factory.mktemp(name.removesuffix(".ipynb"))
        shutil.copytree(EXAMPLES / "data", folder / "data")
        notebook = nbformat.read(EXAMPLES / name, as_version=4)
        client = nbclient.NotebookClient(
            notebook,
            kernel_name=kernel,
            timeout=300,
            resources={"metadata": {"path": str(folder)}},
        )
        runs[name] = (client, notebook, folder)

    async def run_all():
        clients = [client for client, _, _ in runs.values()]
        return await asyncio.gather(*(c.async_execute() for c in clients), return_exceptions=True)

    results = asyncio.run(run_all())
    return {
        name: (notebook, folder, result if isinstance(result, BaseException) else None)
        for (name, (_, notebook, folder)), result in zip(runs.items(), results, strict=True)
    }


def outputs(notebook, containing: str) -> list[dict]:
    """The outputs of the code cell whose source contains ``containing``."""
    cells = [c for c in notebook.cells if c.cell_type == "code" and containing in c.source]
    assert len(cells) == 1, f"{len(cells)} cells contain {containing!r}"
    return cells[0].outputs


def text(notebook) -> str:
    """Everything the notebook printed or displayed as text."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def image_sizes(notebook, containing: str) -> list[tuple[int, int]]:
    """Width and height of each PNG image the cell whose source contains ``containing`` shows."""
    sizes = []
    for output in outputs(notebook, containing):
        if "image/png" in output.get("data", {}):
            data = base64.b64decode(output["data"]["image/png"])
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            sizes.append(struct.unpack(">II", data[16:24]))
    return sizes


def check_quickstart(notebook, folder: Path) -> None:
    """A file of the 15 proteins, the report, one readable plot."""
    with virnuc_dask.open_embeddings(folder / "quickstart.h5") as ds:
        assert ds.sizes["sequence"] == 15 and ds.attrs["random_weights"] == "yes"
    printed = text(notebook)
    assert "Dask dashboard: http://127.0.0.1:" in printed
    assert "15 sequences" in printed  # the run's report
    assert "UniRef50_A0A2C9LWN7: 935 residues" in printed
    # The run's progress is an HTML bar displayed once and updated in place, ending full.
    shown = [o["data"] for o in outputs(notebook, "path = job.run(client)") if "data" in o]
    bars = [d["text/html"] for d in shown if "<progress" in d.get("text/html", "")]
    assert len(bars) == 1 and "(100%)" in bars[0] and "Dask dashboard" in bars[0], shown
    [(width, height)] = image_sizes(notebook, "ax.scatter")  # one plot, of a readable size
    assert width >= 600 and height >= 400


def check_shared_cluster(notebook, folder: Path) -> None:
    """Two files, a graph of several chunks, and a second job that reloaded nothing."""
    with virnuc_dask.open_embeddings(folder / "proteins.h5") as ds:
        assert ds.sizes["sequence"] == 15
    with virnuc_dask.open_embeddings(folder / "fragments.h5") as ds:
        assert ds.sizes["sequence"] == 15
        assert all(name.endswith("_1-100") for name in ds.sequence.values)
        assert int(ds.length.max()) == 100
    [(width, _)] = image_sizes(notebook, "graph = job.graph()")
    assert width >= 600
    reused = "".join(o["data"]["text/plain"] for o in outputs(notebook, "stats[["))
    assert reused.count("True") == 2 and "False" not in reused, reused
    assert "demo scheduler and workers stopped" in text(notebook)


def check_reads(notebook, folder: Path) -> None:
    """Reads refused as protein, then translated; provenance, per-read means and one plot."""
    printed = text(notebook)
    assert "translate" in printed and "six-frame" in printed  # the refusal says what to use
    with virnuc_dask.open_embeddings(folder / "reads.h5") as ds:
        assert {"read", "frame", "strand", "nt_start", "nt_end"} <= set(ds.coords)
        reads = set(ds.read.values)
        assert "all_n" not in reads and len(reads) > 150  # the coding reads kept a frame
        pairs = zip(ds.sequence.values, ds.read.values, strict=True)
        assert all(name.startswith(read) for name, read in pairs)
    assert "200 reads -> " in printed
    assert "reads without a stop-free frame, e.g. noise_" in printed  # random reads have stops
    [(width, height)] = image_sizes(notebook, "ax.bar")
    assert width >= 600 and height >= 300


CHECKS = {
    "01-quickstart.ipynb": check_quickstart,
    "02-shared-cluster.ipynb": check_shared_cluster,
    "03-reads.ipynb": check_reads,
}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, executed):
    assert name in CHECKS, f"examples/{name} has no checks here: add them to CHECKS"
    notebook, folder, error = executed[name]
    if error is not None:
        raise error  # a CellExecutionError names the cell and shows its traceback
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    CHECKS[name](notebook, folder)


def test_notebooks_are_stored_without_outputs():
    assert sorted(CHECKS) == NOTEBOOKS
    for name in NOTEBOOKS:
        notebook = nbformat.read(EXAMPLES / name, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"examples/{name} is stored with outputs: run `nbstripout examples/*.ipynb`"
                )
