"""Faults injected into the workers' real engine, the way an operator's ``WorkerPlugin`` would.

The engine itself is never mocked: each patch wraps ``ReferenceEngine.embed`` in every worker
process and calls the original for the real numbers. The module is pickled by value, so worker
processes need not import the tests.
"""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import numpy as np
from distributed import WorkerPlugin

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class EnginePatch(WorkerPlugin):
    """A fault injected into the reference engine of every worker process.

    Subclasses define ``embed(self, original, engine, sequences)``, which stands in for
    ``ReferenceEngine.embed`` and may call ``original(engine, sequences)``. The batch
    progress callback and the other settings of the real call are passed through.
    """

    def setup(self, worker) -> None:
        from virnuc_dask.engine.reference import ReferenceEngine

        original = getattr(ReferenceEngine, "_unpatched_embed", ReferenceEngine.embed)
        ReferenceEngine._unpatched_embed = original

        def patched(engine, sequences, on_batch=None, **settings):
            def call(engine, sequences):
                return original(engine, sequences, on_batch, **settings)

            return self.embed(call, engine, sequences)

        ReferenceEngine.embed = patched


class SlowChunks(EnginePatch):
    """Make every chunk take at least ``seconds`` longer, so a fault lands mid-run."""

    name = "test-slow-chunks"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def embed(self, original, engine, sequences):
        time.sleep(self.seconds)
        return original(engine, sequences)


class PoisonSequence(EnginePatch):
    """Make the engine raise on one sequence, recording each attempt in ``log``."""

    name = "test-poison"

    def __init__(self, poison: bytes, log: str) -> None:
        self.poison, self.log = poison, log

    def embed(self, original, engine, sequences):
        if self.poison in sequences:
            with open(self.log, "a") as f:
                f.write("attempt\n")
            raise ValueError("this sequence breaks the model")
        return original(engine, sequences)


class MemorySpike(EnginePatch):
    """On the first chunk of the run (once, marked by a file), hold ``gigabytes`` of memory."""

    name = "test-memory-spike"

    def __init__(self, gigabytes: float, marker: str) -> None:
        self.gigabytes, self.marker = gigabytes, marker

    def embed(self, original, engine, sequences):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return original(engine, sequences)
        os.close(fd)
        ballast = np.ones(int(self.gigabytes * 1e9), dtype=np.uint8)  # real resident memory
        time.sleep(30)  # the nanny's memory monitor ends the worker long before this
        return ballast


class CountCalls(EnginePatch):
    """Append one line per engine call (one per chunk computed) to ``log``; sleep ``seconds``."""

    name = "test-count-calls"

    def __init__(self, log: str, seconds: float = 0.0) -> None:
        self.log, self.seconds = log, seconds

    def embed(self, original, engine, sequences):
        with open(self.log, "a") as f:
            f.write(f"{len(sequences)}\n")
        time.sleep(self.seconds)
        return original(engine, sequences)


class Hang(EnginePatch):
    """Hang (sleep ``seconds``) on a chunk holding ``sequence``; only once if ``once`` is a path.

    ``once`` names a marker file created on the first hang: later attempts run normally.
    """

    name = "test-hang"

    def __init__(self, sequence: bytes, seconds: float, once: str | None = None) -> None:
        self.sequence, self.seconds, self.once = sequence, seconds, once

    def embed(self, original, engine, sequences):
        if self.sequence in sequences:
            first = True
            if self.once is not None:
                try:
                    os.close(os.open(self.once, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    first = False
            if first:
                time.sleep(self.seconds)
        return original(engine, sequences)


class SlowBatches(WorkerPlugin):
    """Make every batch of the reference engine take at least ``seconds`` longer."""

    name = "test-slow-batches"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def setup(self, worker) -> None:
        from virnuc_dask.engine.reference import ReferenceEngine

        original = getattr(ReferenceEngine, "_unpatched_batch", ReferenceEngine._embed_batch)
        ReferenceEngine._unpatched_batch = original

        def slow(engine, *args):
            time.sleep(self.seconds)
            return original(engine, *args)

        ReferenceEngine._embed_batch = slow
