"""Helpers for tests: random sequences, FASTA writing, fair-esm's own reference."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from virnuc_dask.engine.fidelity import row_agreement

#: The 2-layer, 64-wide ESM-2 architecture that keeps CPU tests fast.
TINY = "esm2_t2_tiny"
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
#: The command line, run by this interpreter.
CLI = [sys.executable, "-m", "virnuc_dask.cli"]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "some_proteins.fasta"


def random_sequences(count: int, low: int, high: int, seed: int = 0) -> list[str]:
    """``count`` random protein sequences with lengths drawn uniformly in ``[low, high]``."""
    rng = random.Random(seed)
    return ["".join(rng.choices(AMINO_ACIDS, k=rng.randint(low, high))) for _ in range(count)]


def write_fasta(path: Path, sequences: list[str], ids: list[str] | None = None, width: int = 60):
    """Write sequences as multi-line FASTA records ``seq0``, ``seq1``, ... and return the ids."""
    ids = ids or [f"seq{i}" for i in range(len(sequences))]
    with open(path, "w") as f:
        for ident, seq in zip(ids, sequences, strict=True):
            f.write(f">{ident} test record\n")
            for start in range(0, len(seq), width):
                f.write(seq[start : start + width] + "\n")
    return ids


def fair_esm_embeddings(model, sequences: list[str], layers: list[int]) -> np.ndarray:
    """fair-esm's own forward, one sequence at a time (no padding), pooled over residues.

    The reference every equivalence test compares with: batch converter, ``model(tokens,
    repr_layers=...)``, mean over positions 1..L (BOS and EOS excluded), truncation at 1022.
    """
    convert = model.alphabet.get_batch_converter(1022)
    out = []
    with torch.inference_mode():
        for seq in sequences:
            _, _, tokens = convert([("x", seq)])
            reps = model(tokens, repr_layers=layers)["representations"]
            n = min(len(seq), 1022)
            out.append(np.stack([reps[layer][0, 1 : n + 1].mean(0).numpy() for layer in layers]))
    return np.stack(out)


def assert_rows_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5):
    """Every row equal to the reference within ``rtol`` relative (norm of the difference)."""
    assert actual.shape == expected.shape
    _, error = row_agreement(actual, expected)
    worst = int(error.argmax())
    assert error.max() <= rtol, f"row {worst}: relative error {error[worst]:.3g} > {rtol}"


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} after {timeout} s"
        time.sleep(0.2)


@contextlib.contextmanager
def processes(*commands: list[str], cwd: Path | None = None):
    """Start each command as a process, output discarded; on exit stop them, last first.

    Yields the ``Popen`` objects. A process still running 30 s after ``SIGTERM`` is killed.
    """
    started = []
    try:
        for command in commands:
            started.append(subprocess.Popen(
                command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            ))  # fmt: skip
        yield started
    finally:
        stop(started)


def stop(started: list[subprocess.Popen]) -> None:
    """Stop processes, last first: ``SIGTERM``, then a kill for any still running 30 s later."""
    for proc in reversed(started):
        proc.terminate()
    for proc in started:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def two_worker_cluster():
    """A real ``LocalCluster`` of two worker processes (one thread each), and its client."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def scheduler_address(scheduler_file: Path, timeout: float = 60) -> str:
    """The address in the file ``dask scheduler --scheduler-file`` writes, once it is there."""
    deadline = time.time() + timeout
    while not scheduler_file.exists() and time.time() < deadline:
        time.sleep(0.1)
    return json.loads(scheduler_file.read_text())["address"]


@contextlib.contextmanager
def dask_processes(folder: Path, workers: int, *, nanny: bool = True):
    """Start ``dask scheduler`` and ``workers`` ``dask worker`` processes on 127.0.0.1.

    Yields the scheduler file, the scheduler address and the worker ``Popen`` objects; every
    process is stopped on exit.
    """
    scheduler_file = folder / "scheduler.json"
    dask = str(Path(sys.executable).with_name("dask"))
    scheduler = [
        *(dask, "scheduler", "--host", "127.0.0.1", "--port", "0"),
        *("--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)),
    ]
    with processes(scheduler):
        address = scheduler_address(scheduler_file)
        worker = [
            *(dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1"),
            *("--no-dashboard", "--nanny" if nanny else "--no-nanny"),
        ]
        with processes(*[worker] * workers) as started:
            yield scheduler_file, address, started


def fair_esm_residues(model, sequence: str, layers: list[int]) -> np.ndarray:
    """fair-esm's per-token representations of one sequence: ``(residues, layers, dim)``.

    Positions 1..n of ``model(tokens, repr_layers=...)`` (BOS and EOS excluded), the sequence
    truncated at 1022 residues as fair-esm's batch converter does.
    """
    convert = model.alphabet.get_batch_converter(1022)
    with torch.inference_mode():
        _, _, tokens = convert([("x", sequence)])
        reps = model(tokens, repr_layers=layers)["representations"]
    n = min(len(sequence), 1022)
    return np.stack([reps[layer][0, 1 : n + 1].numpy() for layer in layers], axis=1)


def collect_residues(engine, sequences: list[bytes], **settings) -> tuple[np.ndarray, dict]:
    """Run ``engine.embed`` with a per-residue sink; return pooled and ``{position: rows}``."""
    rows: dict[int, np.ndarray] = {}

    def sink(positions, values, counts):
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for k, position in enumerate(positions.tolist()):
            assert position not in rows, f"sequence {position} handed over twice"
            rows[position] = values[bounds[k] : bounds[k + 1]].copy()

    pooled = engine.embed(sequences, on_residues=sink, **settings)
    return pooled, rows
