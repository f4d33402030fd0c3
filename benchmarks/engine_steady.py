"""The engine's own steady rate: the packed engine alone on ``viral``, as a worker builds it.

What a command-line job is compared with (``job_wall.py``'s wall/steady) is the engine's steady
rate in the same session. Where the job's output records its phases, that rate is its tokens
over the ``compute`` phase; where it does not (an older version of the tool), this benchmark
gives it: the model loaded by name from the work folder's checkpoint (``common.checkpoints``,
the same random weights the jobs load), wrapped by ``build_engine`` in the precision a worker
would use (bf16 packed engine on a GPU, fp32 reference engine on the CPU), and timed over the
first N ``viral`` peptides in a fresh process; the engine's construction (compile and warm-up
on a GPU) is outside the timed embedding.

Decisions:

- One GPU only: a 2-GPU rate is never assumed to be twice the 1-GPU one, so a 2-GPU job
  without phases keeps a null steady rate.
- A fresh process per model (``common.children``), like a new worker: this process holds no
  GPU, and one model's memory never weighs on the next.
- ``job_wall.py`` and ``gpu_speedup.py`` call ``fill_missing`` after a model's jobs, so the
  engine is measured only when a 1-GPU job lacks phases; run alone, this benchmark measures
  every model given. Either way the figures go to the ``engine_alone`` part of the day's
  results file (``common.results``).

    python benchmarks/engine_steady.py --work /tmp/jw --models esm2_t36_3B_UR50D
    python benchmarks/engine_steady.py --smoke --work /tmp/jw
"""

from __future__ import annotations

import sys
import time

from common.children import child
from common.machine import gpu_machine
from common.options import invocation, job_parser, parse
from common.results import fill_rates, save, short
from common.tables import fmt, targets_table
from common.work import Work, open_work, prepare
from common.workloads import peptides, tokens_of


def child_engine(model: str, count: int, seed: int) -> dict:
    """The engine alone on the first ``count`` viral peptides, as a worker builds it.

    Parameters
    ----------
    model
        The model, loaded by name from ``$TORCH_HOME``'s hub cache.
    count
        How many of the ``viral`` peptides are embedded.
    seed
        The peptides' seed.

    Returns
    -------
    dict
        ``model``, ``engine`` (its class), ``device``, ``torch_threads``, ``sequences``,
        ``tokens``, ``build_seconds``, ``seconds`` and ``tokens_per_s``.
    """
    import torch

    from virnuc_dask.engine import build_engine
    from virnuc_dask.model.checkpoint import resolve_weights
    from virnuc_dask.model.loading import load_model
    from virnuc_dask.model.registry import model_spec

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    sequences = peptides(count, seed)
    started = time.perf_counter()
    net = load_model(resolve_weights(model))
    engine = build_engine(net, device=device, dtype="auto", layers=[model_spec(model).num_layers])
    build = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    engine.embed(sequences)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    tokens = tokens_of(sequences)
    return {
        "model": model,
        "engine": type(engine).__name__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "sequences": count,
        "tokens": tokens,
        "build_seconds": round(build, 2),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
    }


def measure(model: str, work: Work, count: int, seed: int, timeout: float) -> dict:
    """``child_engine`` in a fresh process on the first GPU (the CPU with ``--smoke``).

    Parameters
    ----------
    model
        The model (its checkpoint written by ``common.work.prepare``).
    work
        The work folder.
    count, seed
        The ``viral`` peptides: how many, and their seed.
    timeout
        Seconds before the child is given up.

    Returns
    -------
    dict
        ``child_engine``'s answer, or ``{"error": ...}``.
    """
    print(f"  engine alone, {model}, viral ...", flush=True)
    env = work.env_for(work.gpus[:1])
    return child(child_engine, env, timeout, model=model, count=count, seed=seed)


def fill_missing(
    model: str, rows: list[dict], work: Work, count: int, seed: int, timeout: float
) -> dict | None:
    """Measure the engine where a 1-GPU job of ``model`` has no phases; fill those rows.

    Parameters
    ----------
    model
        The model whose rows are looked at.
    rows
        Job rows (changed in place: rows without a steady rate get the engine's).
    work, count, seed, timeout
        As for ``measure``.

    Returns
    -------
    dict or None
        The engine's measurement, or None where it was not needed.
    """
    missing = [r for r in rows if r["model"] == model and r["steady_source"] is None]
    if not any(r["gpus"] <= 1 for r in missing):
        return None
    engine = measure(model, work, count, seed, timeout)
    for row in missing:
        fill_rates(row, engine)
    return engine


def jobs_with_engine(
    model: str, inputs: dict, work: Work, flags: set, args, **jobs
) -> tuple[list[dict], dict | None]:
    """A model's command-line jobs (``common.cli_job.model_jobs``), their rates filled in by
    the engine alone where their outputs record no phases (:func:`fill_missing`).

    ``args`` gives ``viral_sequences``, ``seed``, ``viral_runs`` and ``timeout``; ``jobs``
    the rest of ``model_jobs``'s options (``workloads``, ``gpu_counts``, ``smoke``).

    Returns
    -------
    tuple
        The job rows, and the engine's measurement (None where it was not needed).
    """
    from common.cli_job import model_jobs

    rows = model_jobs(
        model,
        inputs,
        work.gpus,
        work.env,
        flags,
        work.folder,
        viral_runs=args.viral_runs,
        timeout=args.timeout,
        **jobs,
    )
    engine = fill_missing(model, rows, work, args.viral_sequences, args.seed, args.timeout)
    return rows, engine


def engine_table(engines: dict[str, dict]) -> list[str]:
    """One line per model: engine, device, threads, tokens, build and timed seconds, rate."""
    lines = [
        f"{'engine':<8} {'class':<16} {'device':<7} {'threads':>7} {'seqs':>7} {'tokens':>11} "
        f"{'build s':>8} {'seconds':>8} {'tok/s':>10}"
    ]
    for model, e in engines.items():
        if "error" in e:
            lines.append(f"{short(model):<8} error: {e['error']}")
            continue
        lines.append(
            f"{short(model):<8} {e['engine']:<16} {e['device']:<7} {e['torch_threads']:>7} "
            f"{e['sequences']:>7,} {e['tokens']:>11,} {fmt(e['build_seconds'], '.2f'):>8} "
            f"{fmt(e['seconds'], '.2f'):>8} {fmt(e['tokens_per_s'], ',.0f'):>10}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    """Measure the engine alone for every model given; merge into the day's results file."""
    args = parse(job_parser(__doc__.splitlines()[0], gpus=False), argv)
    work = open_work(args.work, args.smoke)
    inputs, setup = prepare(work, args.models, args.viral_sequences, args.seed)
    engines = {
        model: measure(model, work, args.viral_sequences, args.seed, args.timeout)
        for model in args.models
    }
    info = gpu_machine(work.gpus)
    out, result = save(
        invocation("engine_steady", args, inputs, setup),
        info,
        smoke=args.smoke,
        out_json=args.out_json,
        fresh=args.fresh,
        engines=engines,
    )
    print("\n".join(engine_table(result["engine_alone"]) + ["", *targets_table(result["targets"])]))
    if any("error" in e for e in engines.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
