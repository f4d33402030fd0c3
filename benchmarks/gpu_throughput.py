"""Throughput of ESM-2 embedding on one GPU: our engine and pipeline, fair-esm, transformers.

Rows, for each model and workload (tokens = residues + 2 per sequence, random weights):

- ``a``: end to end through the Dask pipeline, ``virnuc_dask.embed`` from FASTA to HDF5, bf16
  (cold: the first run, with model building and compiling; warm: a second run);
- ``b``: the packed engine alone (``PackedEngine``), bf16, on the sequences in memory;
- ``c``: fair-esm as VirNucPro runs it: fp32, length-sorted padded batches of 2,048 tokens;
- ``d``: fair-esm bf16, length-sorted padded batches of 16,384 tokens;
- ``e``: transformers ``EsmModel`` bf16, sdpa attention, padded batches of 65,536 tokens.

Workloads: ``viral`` (six-frame translations of random 300-500 bp reads, stop codons read as
``X``: peptides of 99-166 residues) and ``proteome`` (log-normal lengths, median 300, clipped to
30-1022). The slow rows run on every n-th sequence (``--fp32-stride``, ``--peer-stride``), the
same distribution; the fp32 subset lies inside the others, so fidelity against fp32 is measured
on the same sequences.

The table gives each row's ratio to ``c`` and to the best of ``d`` and ``e``; the JSON in
``--results-dir`` (``gpu_throughput-<date>-<gpu>.json``) holds every figure and the versions.

    python benchmarks/gpu_throughput.py                  # 3B and 650M, both workloads, all rows
    python benchmarks/gpu_throughput.py --smoke          # tiny model, few sequences, CPU is fine

Scaling over GPUs: :func:`bench_pipeline` takes the number of GPUs of its local cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.metadata
import json
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from virnuc_dask.engine.fidelity import row_agreement
from virnuc_dask.engine.packed import PackedEngine
from virnuc_dask.engine.reference import ReferenceEngine
from virnuc_dask.model.checkpoint import resolve_weights
from virnuc_dask.model.loading import load_model
from virnuc_dask.model.registry import model_spec
from virnuc_dask.model.tokens import MODEL_WINDOW, padded_tokens

MODELS = ["esm2_t36_3B_UR50D", "esm2_t33_650M_UR50D"]
WORKLOADS = ["viral", "proteome"]
METHODS = {
    "a": "end to end, Dask pipeline, bf16",
    "b": "packed engine, bf16",
    "c": "fair-esm fp32, padded 2,048",
    "d": "fair-esm bf16, padded 16,384",
    "e": "transformers bf16 sdpa, padded 65,536",
}
AMINO_ACIDS = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
# The standard genetic code, codons ordered TTT, TTC, TTA, ... with bases in the order T C A G.
CODONS = np.frombuffer(
    b"FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG", dtype=np.uint8
)


# Workloads -------------------------------------------------------------------------------------


def viral_peptides(reads: int, rng: np.random.Generator) -> list[bytes]:
    """Six-frame translations of random reads of 300-500 bp: ``6 * reads`` peptides.

    Stop codons become ``X`` so every frame keeps its full length, as a six-frame translation
    fed to the model without ORF calling does.
    """
    table = CODONS.copy()
    table[table == ord("*")] = ord("X")
    peptides = []
    for length in rng.integers(300, 501, size=reads):
        forward = rng.integers(0, 4, size=length)
        reverse = forward[::-1] ^ 2  # T<->A and C<->G in T C A G numbering
        for strand in (forward, reverse):
            for frame in range(3):
                codons = strand[frame : frame + (length - frame) // 3 * 3].reshape(-1, 3)
                peptides.append(table[codons @ np.array([16, 4, 1])].tobytes())
    return peptides


def proteome(count: int, rng: np.random.Generator) -> list[bytes]:
    """Random proteins with log-normal lengths (median 300), clipped to 30-1022 residues."""
    lengths = np.clip(np.round(rng.lognormal(np.log(300), 0.6, size=count)), 30, MODEL_WINDOW)
    return [rng.choice(AMINO_ACIDS, size=int(n)).tobytes() for n in lengths]


def make_workload(name: str, args: argparse.Namespace) -> list[bytes]:
    rng = np.random.default_rng(args.seed)
    if name == "viral":
        return viral_peptides(args.viral_reads, rng)
    return proteome(args.proteins, rng)


def token_count(sequences: list[bytes]) -> int:
    return sum(min(len(s), MODEL_WINDOW) + 2 for s in sequences)


# Measurements ----------------------------------------------------------------------------------


@dataclass
class Run:
    """One measured row: which method on which sequences, how fast, and its embeddings."""

    model: str
    workload: str
    mode: str
    label: str
    indices: np.ndarray
    tokens: int
    seconds: float
    embeddings: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def record(self) -> dict:
        return {
            "model": self.model,
            "workload": self.workload,
            "mode": self.mode,
            "method": self.label,
            "sequences": len(self.indices),
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 1),
            **self.extra,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def fidelity(run: Run, reference: Run) -> dict:
    """Smallest cosine and largest relative error against ``reference`` on common sequences."""
    common, mine, theirs = np.intersect1d(run.indices, reference.indices, return_indices=True)
    cosine, error = row_agreement(run.embeddings[mine], reference.embeddings[theirs])
    return {
        "compared": len(common),
        "min_cosine": round(float(cosine.min()), 7),
        "max_rel_error": round(float(error.max()), 5),
    }


def build_fair_esm(name: str, device: torch.device, seed: int) -> torch.nn.Module:
    """fair-esm's ESM-2 with the random weights every pipeline worker builds for ``seed``.

    The same weights as row ``a``'s workers, so its output is compared with row ``c`` too.
    """
    source = resolve_weights(name, random_weights=True, seed=seed)
    return load_model(source).to(device)


def build_transformers(name: str, device: torch.device, seed: int) -> torch.nn.Module:
    """transformers' ``EsmModel`` in ESM-2's shape (rotary, token dropout), bf16, sdpa attention."""
    from transformers import EsmConfig, EsmModel

    spec = model_spec(name)
    config = EsmConfig(
        vocab_size=33,
        hidden_size=spec.embed_dim,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.attention_heads,
        intermediate_size=4 * spec.embed_dim,
        position_embedding_type="rotary",
        token_dropout=True,
        mask_token_id=32,
        pad_token_id=1,
        emb_layer_norm_before=False,
        max_position_embeddings=MODEL_WINDOW + 4,
        layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = EsmModel._from_config(config, attn_implementation="sdpa", add_pooling_layer=False)
    return model.to(torch.bfloat16).eval()


def transformers_embed(model, sequences: list[bytes], budget: int) -> np.ndarray:
    """Length-sorted padded batches of ``budget`` tokens through ``EsmModel``; residue means."""
    from virnuc_dask.engine.batching import token_budget_batches

    device = next(model.parameters()).device
    residues = np.array([min(len(s), MODEL_WINDOW) for s in sequences])
    order = np.argsort(-residues, kind="stable")
    out = np.empty((len(sequences), 1, model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for cut in token_budget_batches(residues[order] + 2, budget, padded=True):
            rows = order[cut]
            tokens = torch.from_numpy(padded_tokens([sequences[i] for i in rows])).to(device)
            hidden = model(input_ids=tokens, attention_mask=tokens.ne(1)).last_hidden_state
            lengths = torch.from_numpy(residues[rows]).to(device)
            positions = torch.arange(tokens.shape[1], device=device)
            mask = ((positions >= 1) & (positions <= lengths[:, None])).float()[..., None]
            pooled = (hidden.float() * mask).sum(1) / lengths[:, None].float()
            out[rows, 0] = pooled.cpu().numpy()
    return out


def subset(sequences: list[bytes], stride: int) -> tuple[np.ndarray, list[bytes]]:
    indices = np.arange(0, len(sequences), stride)
    return indices, [sequences[i] for i in indices]


def end_to_end(
    client, name: str, sequences: list[bytes], workdir: Path, *, dtype: str, tag: str, seed: int
) -> tuple[float, np.ndarray]:
    """Seconds for the pipeline on ``client`` to turn ``sequences`` (FASTA) into HDF5, and
    the embeddings it wrote (rows in input order)."""
    import virnuc_dask

    fasta = workdir / f"{name}-{tag}.fasta"
    fasta.write_bytes(b"".join(b">s%d\n%s\n" % (i, s) for i, s in enumerate(sequences)))
    output = workdir / f"{name}-{tag}.h5"
    start = time.perf_counter()
    virnuc_dask.embed(
        inputs=[fasta],
        output=output,
        model=name,
        random_weights=True,
        seed=seed,
        dtype=dtype,
        client=client,
        progress=False,
    )
    seconds = time.perf_counter() - start
    with virnuc_dask.open_embeddings(output) as ds:
        embeddings = ds.embedding.values[:, None, :]
    return seconds, embeddings


# One model, all workloads ----------------------------------------------------------------------


def bench_model(name: str, workloads: dict[str, list[bytes]], args) -> list[Run]:
    """Every asked-for row of one model, in the order that needs one copy of its weights."""
    device = torch.device(args.device)
    last = model_spec(name).num_layers
    runs: list[Run] = []
    fp32: dict[str, Run] = {}

    def add(run: Run, note: str = "") -> Run:
        runs.append(run)
        print(f"  {run.model} {run.workload} {run.mode}: {run.tokens_per_s:,.0f} tok/s {note}")
        return run

    model = build_fair_esm(name, device, args.seed)
    if "c" in args.modes:
        for workload, seqs in workloads.items():
            indices, part = subset(seqs, args.fp32_stride)
            engine = ReferenceEngine(model, layers=[last], tokens_per_batch=2048)
            out, seconds = timed(device, lambda e=engine, p=part: e.embed(p))
            fp32[workload] = add(
                Run(name, workload, "c", METHODS["c"], indices, token_count(part), seconds, out)
            )
    model = model.to(torch.bfloat16)
    for workload, seqs in workloads.items():
        if "d" not in args.modes:
            break
        indices, part = subset(seqs, args.peer_stride)
        engine = ReferenceEngine(model, layers=[last], tokens_per_batch=16384)
        out, seconds = timed(device, lambda e=engine, p=part: e.embed(p))
        run = Run(name, workload, "d", METHODS["d"], indices, token_count(part), seconds, out)
        if workload in fp32:
            run.extra.update(fidelity(run, fp32[workload]))
        add(run)
    if "b" in args.modes:
        bench_engine(name, model, workloads, fp32, args, add)
    del model
    release(device)
    if "e" in args.modes:
        bench_transformers(name, workloads, args, add)
        release(device)
    if "a" in args.modes:
        bench_pipeline(name, workloads, args, add, fp32)
    return runs


def bench_engine(name, model, workloads, fp32, args, add) -> None:
    """Row ``b`` for each compile setting and token budget asked for."""
    for compiled in args.compile:
        engine = PackedEngine(model, layers=[model.num_layers], compile=compiled)
        auto = engine.tokens_per_batch
        for budget in args.budgets:
            engine.tokens_per_batch = auto if budget == "auto" else int(budget)
            for workload, seqs in workloads.items():
                run = engine_run(name, workload, seqs, engine, args)
                if workload in fp32:
                    run.extra.update(fidelity(run, fp32[workload]))
                add(run, _fidelity_note(run))


def engine_run(name: str, workload: str, seqs: list[bytes], engine: PackedEngine, args) -> Run:
    """Best of ``args.repeats`` timed runs of the engine over all of ``seqs``."""
    device = torch.device(args.device)
    times = []
    for _ in range(args.repeats):
        out, seconds = timed(device, lambda: engine.embed(seqs))
        times.append(seconds)
    how = "compiled" if engine.compiled else "eager"
    label = f"{METHODS['b']}, {how}, {engine.tokens_per_batch:,}/batch"
    run = Run(name, workload, "b", label, np.arange(len(seqs)), token_count(seqs), min(times), out)
    run.extra.update(
        compiled=engine.compiled,
        compile_seconds=round(engine.compile_seconds, 2),
        tokens_per_batch=engine.tokens_per_batch,
        repeat_seconds=[round(t, 4) for t in times],
        oom_splits=engine.oom_splits,
    )
    return run


def bench_transformers(name, workloads, args, add) -> None:
    """Row ``e``, skipped with a message where transformers is missing or refuses the model."""
    device = torch.device(args.device)
    try:
        model = build_transformers(name, device, args.seed)
    except (ImportError, ValueError) as error:
        print(f"  {name}: row e skipped: {error}")
        return
    for workload, seqs in workloads.items():
        indices, part = subset(seqs, args.peer_stride)
        _, seconds = timed(device, lambda p=part: transformers_embed(model, p, 65536))
        add(Run(name, workload, "e", METHODS["e"], indices, token_count(part), seconds))


def bench_pipeline(name, workloads, args, add, fp32, *, gpus: int = 1) -> None:
    """Row ``a`` on a fresh local cluster of ``gpus`` workers (one per GPU).

    A small warm-up job first makes every worker build (and compile) its model; each workload
    is then timed from FASTA to HDF5: its steady-state rate. The total wall time adds the
    cluster start and the warm-up, as a user starting from nothing would see it. Skipped with
    a message where the pipeline cannot be imported.
    """
    try:
        from virnuc_dask.cluster.existing import connect
    except ImportError as error:
        print(f"  row a skipped: the pipeline does not import ({error})")
        return
    dtype = "bf16" if args.device.startswith("cuda") else "auto"
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        with connect(workers=gpus) as (client, _):
            cluster_seconds = time.perf_counter() - started
            first = next(iter(workloads.values()))
            warmup, _ = end_to_end(
                client,
                name,
                first[: 64 * gpus],
                Path(tmp),
                dtype=dtype,
                tag="warmup",
                seed=args.seed,
            )
            for workload, seqs in workloads.items():
                seconds, out = end_to_end(
                    client, name, seqs, Path(tmp), dtype=dtype, tag=workload, seed=args.seed
                )
                label = f"{METHODS['a'].replace('bf16', dtype)}, {gpus} GPU(s)"
                run = Run(
                    name,
                    workload,
                    "a",
                    label,
                    np.arange(len(seqs)),
                    token_count(seqs),
                    seconds,
                    out,
                )
                run.extra.update(
                    gpus=gpus,
                    cluster_start_seconds=round(cluster_seconds, 2),
                    warmup_seconds=round(warmup, 2),
                    total_wall_seconds=round(cluster_seconds + warmup + seconds, 2),
                )
                if workload in fp32:
                    run.extra.update(fidelity(run, fp32[workload]))
                add(run, _fidelity_note(run))


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fidelity_note(run: Run) -> str:
    if "min_cosine" not in run.extra:
        return ""
    return f"(cos {run.extra['min_cosine']:.6f}, rel err {run.extra['max_rel_error']:.4f})"


# Report ----------------------------------------------------------------------------------------


def table(records: list[dict]) -> str:
    """Rows with their ratio to ``c`` and to the best of ``d`` and ``e``, per model and workload."""
    lines = [
        f"{'model':<20} {'workload':<9} {'':<2} {'method':<48} {'tok/s':>10} {'x c':>7} "
        f"{'x best d/e':>10} {'min cos':>9} {'max err':>8}"
    ]
    for record in records:
        by_mode = {
            r["mode"]: r["tokens_per_s"]
            for r in records
            if (r["model"], r["workload"]) == (record["model"], record["workload"])
            and r["mode"] in "cde"
        }
        rate = record["tokens_per_s"]
        to_c = f"{rate / by_mode['c']:.2f}" if "c" in by_mode else "-"
        best = max((by_mode[m] for m in "de" if m in by_mode), default=None)
        to_best = f"{rate / best:.2f}" if best else "-"
        cosine = f"{record['min_cosine']:.6f}" if "min_cosine" in record else ""
        error = f"{record['max_rel_error']:.4f}" if "max_rel_error" in record else ""
        lines.append(
            f"{record['model']:<20} {record['workload']:<9} {record['mode']:<2} "
            f"{record['method'][:48]:<48} {rate:>10,.0f} {to_c:>7} {to_best:>10} "
            f"{cosine:>9} {error:>8}"
        )
    return "\n".join(lines)


def versions() -> dict:
    found = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("fair-esm", "dask", "distributed", "dask-cuda", "transformers", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS)
    parser.add_argument("--modes", default="abcde", help="rows to run, letters of abcde")
    parser.add_argument("--viral-reads", type=int, default=1000, help="reads (6 peptides each)")
    parser.add_argument("--proteins", type=int, default=1500)
    parser.add_argument("--fp32-stride", type=int, default=12, help="row c: every n-th sequence")
    parser.add_argument("--peer-stride", type=int, default=4, help="rows d, e: every n-th")
    parser.add_argument("--repeats", type=int, default=2, help="row b: best of n timed runs")
    parser.add_argument("--budgets", nargs="+", default=["auto"], help="row b token budgets")
    parser.add_argument(
        "--compile",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="row b with torch.compile on, off, or both",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, few sequences, no compile: a CPU check"
    )
    args = parser.parse_args(argv)
    args.compile = [choice == "on" for choice in args.compile]
    if args.peer_stride and args.fp32_stride % args.peer_stride:
        parser.error("--fp32-stride must be a multiple of --peer-stride (nested subsets)")
    if args.smoke:
        args.models = ["esm2_t2_tiny"]
        args.viral_reads, args.proteins, args.repeats = 20, 30, 1
        args.compile = [args.device.startswith("cuda")]
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    device = torch.device(args.device)
    workloads = {name: make_workload(name, args) for name in args.workloads}
    for name, seqs in workloads.items():
        print(f"workload {name}: {len(seqs)} sequences, {token_count(seqs):,} tokens")
    records = []
    for name in args.models:
        records += [run.record() for run in bench_model(name, workloads, args)]
        release(device)
    today = dt.date.today().isoformat()
    gpu = gpu_name(device)
    report = {
        "date": today,
        "gpu": gpu,
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "workloads": {
            name: {"sequences": len(seqs), "tokens": token_count(seqs)}
            for name, seqs in workloads.items()
        },
        "peers": METHODS,
        "rows": records,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    path = args.results_dir / f"gpu_throughput-{today}-{slug}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{gpu}, torch {torch.__version__}; written to {path}\n")
    print(table(records))
    return path


if __name__ == "__main__":
    main()
