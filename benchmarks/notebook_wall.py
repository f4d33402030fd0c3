"""The notebook case: what a second ``embed()`` costs on a cluster that stays up.

A notebook holds one cluster and one client for the session and embeds several inputs on it;
the first call pays the workers' model load, the later ones should not. This benchmark is one
Python process (a child of this script) that starts a ``LocalCUDACluster`` on the first N GPUs
(a ``LocalCluster`` of CPU workers with ``--smoke``) and a ``Client``, then calls
``virnuc_dask.embed(..., client=client)`` twice on ``small`` (the first 100 ``viral``
peptides). Both calls are timed; the second is the one the target judges (<= 3 s), and the
workers' engines are compared before and after it: they must be the same objects (nothing
loaded again).

Decisions:

- The public API as a notebook calls it (``virnuc_dask.embed`` with a client), with the
  weights loaded by name from the work folder's random-weight checkpoints (``common.work``),
  as the command-line jobs of ``job_wall.py`` load them.
- The cluster lives in a child process that prints JSON (``common.children``), so this process
  never holds a GPU and every case starts as a fresh notebook kernel does.
- One case per model and GPU count: ``--gpus`` picks the smallest count given (1 by default),
  as ``job_wall.py --cases notebook`` always did; a case measured again replaces its row in the
  day's results file (``common.results``).

    python benchmarks/notebook_wall.py --work /tmp/jw --models esm2_t36_3B_UR50D
    python benchmarks/notebook_wall.py --smoke --work /tmp/jw
"""

from __future__ import annotations

import time
from pathlib import Path

from common.children import child
from common.cli_job import read_phases
from common.machine import gpu_machine
from common.options import invocation, job_parser, parse
from common.results import save
from common.tables import notebook_table, targets_table
from common.work import Work, open_work, prepare


def child_notebook(model: str, fasta: str, folder: str, gpus: int, workers: int) -> dict:
    """A notebook's session: one cluster and client, ``embed`` twice on ``small``.

    The second call is timed; the workers' engines are compared before and after it to show
    that nothing was loaded again.

    Parameters
    ----------
    model
        The model, loaded by name.
    fasta
        The ``small`` input.
    folder
        Where the output goes (``notebook-MODEL.h5``).
    gpus
        GPUs of the cluster (one worker each); 0: a ``LocalCluster`` of ``workers`` CPU
        worker processes.
    workers
        CPU worker processes where ``gpus`` is 0.

    Returns
    -------
    dict
        ``model``, ``gpus``, ``cluster`` (its class), ``workers``, ``cluster_start_seconds``,
        ``first_seconds``, ``second_seconds``, ``nothing_reloaded`` and the output's
        ``phases``.
    """
    from distributed import Client, LocalCluster

    import virnuc_dask

    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        LocalCUDACluster = None
    started = time.perf_counter()
    if gpus and LocalCUDACluster is not None:
        # One worker per GPU of this process's CUDA_VISIBLE_DEVICES.
        cluster = LocalCUDACluster(host="127.0.0.1", dashboard_address=":0")
    else:
        cluster = LocalCluster(
            n_workers=gpus or workers,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=":0",
        )
    result: dict = {"model": model, "gpus": gpus, "cluster": type(cluster).__name__}
    with cluster, Client(cluster) as client:
        result["workers"] = len(client.scheduler_info(n_workers=-1)["workers"])
        result["cluster_start_seconds"] = round(time.perf_counter() - started, 2)
        for run in ("first", "second"):
            before = client.run(_resident_engines)
            started = time.perf_counter()
            virnuc_dask.embed(
                [fasta],
                Path(folder) / f"notebook-{model}.h5",
                client=client,
                model=model,
                overwrite=True,
                progress=False,
            )
            result[f"{run}_seconds"] = round(time.perf_counter() - started, 3)
        after = client.run(_resident_engines)
        result["nothing_reloaded"] = bool(after) and before == after and all(after.values())
        result["phases"] = read_phases(Path(folder) / f"notebook-{model}.h5")
    return result


def _resident_engines(dask_worker=None) -> list[int]:
    """Identities of the engines resident on a worker (run on each worker by ``Client.run``)."""
    from virnuc_dask.cluster.plugin import state_of

    return sorted(id(engine) for engine in state_of(dask_worker).engines.values())


def measure(model: str, inputs: dict, work: Work, gpus: list[int], timeout: float) -> dict:
    """One notebook case of ``model`` in a fresh process, on the smallest GPU count given.

    Parameters
    ----------
    model
        The model (its checkpoint written by ``common.work.prepare``).
    inputs
        ``common.work.prepare``'s inputs (``small`` is used).
    work
        The work folder (the output goes to ``out/``).
    gpus
        GPU counts asked for; the smallest is used (2 CPU workers with ``--smoke``).
    timeout
        Seconds before the case is given up.

    Returns
    -------
    dict
        ``child_notebook``'s answer (or ``{"error": ...}``), with ``model`` set.
    """
    count = 0 if work.smoke else min(gpus)
    where = f"{count} GPU(s)" if count else "2 CPU workers"
    print(f"  notebook, {model}, {where} ...", flush=True)
    book = child(
        child_notebook,
        work.env_for(work.gpus[:count]),
        timeout,
        model=model,
        fasta=str(inputs["small"]["path"]),
        folder=str(work.folder / "out"),
        gpus=count,
        workers=2,
    )
    book.setdefault("model", model)
    return book


def main(argv: list[str] | None = None) -> None:
    """Run the notebook case of every model given; merge into the day's results file."""
    args = parse(job_parser(__doc__.splitlines()[0]), argv)
    work = open_work(args.work, args.smoke)
    inputs, setup = prepare(work, args.models, args.viral_sequences, args.seed)
    notebooks = [measure(model, inputs, work, args.gpus, args.timeout) for model in args.models]
    info = gpu_machine(work.gpus)
    out, result = save(
        invocation("notebook_wall", args, inputs, setup),
        info,
        smoke=args.smoke,
        out_json=args.out_json,
        fresh=args.fresh,
        notebooks=notebooks,
    )
    lines = notebook_table(result["notebook"]) + ["", *targets_table(result["targets"])]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
