"""Where a compiled engine's start goes, and whether an ahead-of-time layer avoids it.

A compiled engine in a fresh worker spends seconds before its first batch that an eager one
does not: importing torch's compiler stack and compiling (from the cache) the packed layer.
This probe splits that time, and tries the way around it that torch offers: export the layer
once and compile it ahead of time with AOTInductor, then load the package in later processes
without tracing. Results: ``results/compile_start-*.json``; findings in ``README.md``.

Modes (each a fresh process, ``OMP_NUM_THREADS=1`` as in a Dask worker):

- ``imports``: seconds of each import on the compiled path.
- ``compiled``: build a random-weight model on the GPU, build a compiled engine (cache warm
  from an earlier run of this mode), time engine build, warm-up, and the steady rate.
- ``aot-build``: export the packed layer with dynamic sizes and compile it ahead of time
  (AOTInductor) into a package.
- ``aot-run``: load that package in a fresh process and run the engine with it; time load,
  warm-up, steady rate; compare pooled vectors with the eager engine.

    python benchmarks/compile_start.py MODE --model esm2_t33_650M_UR50D --work /tmp/aot
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()


def stamp(times: dict, name: str, since: list) -> None:
    now = time.perf_counter()
    times[name] = round(now - since[0], 3)
    since[0] = now


def imports() -> dict:
    times, since = {}, [time.perf_counter()]
    import torch  # noqa: F401

    stamp(times, "torch", since)
    import esm  # noqa: F401

    stamp(times, "esm", since)
    import virnuc_dask.engine.packed  # noqa: F401

    stamp(times, "engine.packed", since)
    import torch._dynamo  # noqa: F401

    stamp(times, "torch._dynamo", since)
    import torch._inductor.compile_fx  # noqa: F401

    stamp(times, "torch._inductor.compile_fx", since)
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401

    stamp(times, "varlen", since)
    import triton  # noqa: F401

    stamp(times, "triton", since)
    return times


def random_model(name: str):
    import torch

    from virnuc_dask.model.loading import _esm2, _no_initialisation
    from virnuc_dask.model.registry import model_spec

    with _no_initialisation():
        model = _esm2(model_spec(name), token_dropout=True)
    model = model.to("cuda", torch.bfloat16).eval()
    generator = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
        for layer in model.layers:
            for norm in (layer.self_attn_layer_norm, layer.final_layer_norm):
                norm.weight.fill_(1.0)
        model.emb_layer_norm_after.weight.fill_(1.0)
    torch.cuda.synchronize()
    return model


def workload(count: int, seed: int = 1) -> list[bytes]:
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    return [letters[rng.integers(0, 20, rng.integers(50, 171))].tobytes() for _ in range(count)]


def steady(engine, sequences, warm_up: int = 2000) -> float:
    """Tokens/s of one ``embed`` over ``sequences``, after a warm-up on the first ones."""
    import torch

    engine.embed(sequences[:warm_up])
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.embed(sequences)
    torch.cuda.synchronize()
    tokens = sum(len(s) + 2 for s in sequences)
    return tokens / (time.perf_counter() - start)


def compiled(name: str, work: Path) -> dict:
    times, since = {}, [time.perf_counter()]
    import torch

    from virnuc_dask.cluster.plugin import _use_compile_cache
    from virnuc_dask.engine.packed import PackedEngine

    stamp(times, "import", since)
    torch.empty(1, device="cuda")
    _use_compile_cache()
    model = random_model(name)
    stamp(times, "build_model", since)
    engine = PackedEngine(model, layers=[model.num_layers], compile=False)
    stamp(times, "eager_engine", since)
    from virnuc_dask.engine import layers

    layers.prepare_compiled_kernels()
    stamp(times, "prepare_kernels", since)
    engine.enable_compile()
    stamp(times, "compile_warm_up", since)
    sequences = workload(30000)
    times["steady_tok_s"] = round(steady(engine, sequences))
    reference = engine.embed(sequences[:500])
    import numpy as np

    np.save(work / f"{name}-compiled.npy", reference)
    return times


class AotLayer:
    """The packed layer with its weights as inputs, for export."""

    def __init__(self, eps: float, heads: int) -> None:
        import torch

        class Layer(torch.nn.Module):
            def forward(
                self,
                x,
                rotary,
                cu_seqlens,
                span,
                ln1_w,
                ln1_b,
                qkv_w,
                qkv_b,
                out_w,
                out_b,
                ln2_w,
                ln2_b,
                fc1_w,
                fc1_b,
                fc2_w,
                fc2_b,
            ):
                import torch.nn.functional as F

                from virnuc_dask.engine.layers import apply_rotary

                tokens, dim = x.shape
                h = F.layer_norm(x, (dim,), ln1_w, ln1_b, eps)
                qkv = F.linear(h, qkv_w, qkv_b)
                q, k, v = qkv.view(tokens, 3, heads, dim // heads).unbind(1)
                cos, sin = rotary[0], rotary[1]
                q = apply_rotary(q, cos, sin).to(x.dtype)
                k = apply_rotary(k, cos, sin).to(x.dtype)
                max_len = span.shape[0]
                out = torch.ops.aten._flash_attention_forward(
                    q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, False, False
                )[0]
                x = x + F.linear(out.reshape(tokens, dim), out_w, out_b)
                h = F.layer_norm(x, (dim,), ln2_w, ln2_b, eps)
                return x + F.linear(F.gelu(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b)

        self.module = Layer()


def layer_weights(layer, qkv):
    return (
        layer.self_attn_layer_norm.weight,
        layer.self_attn_layer_norm.bias,
        qkv[0],
        qkv[1],
        layer.self_attn.out_proj.weight,
        layer.self_attn.out_proj.bias,
        layer.final_layer_norm.weight,
        layer.final_layer_norm.bias,
        layer.fc1.weight,
        layer.fc1.bias,
        layer.fc2.weight,
        layer.fc2.bias,
    )


def aot_build(name: str, work: Path) -> dict:
    times, since = {}, [time.perf_counter()]
    import torch

    from virnuc_dask.engine.layers import fuse_qkv, rotary_tables
    from virnuc_dask.engine.packing import pack_batch

    stamp(times, "import", since)
    model = random_model(name)
    stamp(times, "build_model", since)
    layer = model.layers[0]
    qkv = fuse_qkv(layer.self_attn)
    probe = AotLayer(layer.self_attn_layer_norm.eps, layer.attention_heads)
    batch = pack_batch(workload(60), 1022)
    t = torch.tensor
    tokens = len(batch.tokens)
    x = torch.randn(tokens, model.embed_dim, device="cuda", dtype=torch.bfloat16)
    rotary = rotary_tables(model.embed_dim // model.attention_heads, 1024, "cuda")
    rotary = rotary[:, t(batch.positions, device="cuda").long()]
    cu = t(batch.cu_seqlens, device="cuda", dtype=torch.int32)
    span = torch.empty(batch.max_len, device="cuda", dtype=torch.int8)
    Dim = torch.export.Dim
    T, S, L = (
        Dim("tokens", min=4, max=1 << 20),
        Dim("bounds", min=3, max=1 << 16),
        Dim("span", min=3, max=1024),
    )
    dynamic = ({0: T}, {1: T}, {0: S}, {0: L}, *([None] * 12))
    args = (x, rotary, cu, span, *layer_weights(layer, qkv))
    exported = torch.export.export(probe.module, args, dynamic_shapes=dynamic)
    stamp(times, "export", since)
    options = {"max_autotune_pointwise": True, "coordinate_descent_tuning": True}
    path = torch._inductor.aoti_compile_and_package(
        exported, package_path=str(work / f"{name}.pt2"), inductor_configs=options
    )
    stamp(times, "aoti_compile", since)
    times["package_mb"] = round(Path(path).stat().st_size / 1e6, 1)
    return times


def aot_run(name: str, work: Path, loader: str) -> dict:
    times, since = {}, [time.perf_counter()]
    import numpy as np
    import torch

    from virnuc_dask.engine.packed import PackedEngine

    stamp(times, "import", since)
    torch.empty(1, device="cuda")
    model = random_model(name)
    stamp(times, "build_model", since)
    engine = PackedEngine(model, layers=[model.num_layers], compile=False)
    stamp(times, "eager_engine", since)
    eager = engine.embed(workload(30000)[:500])
    if loader == "python":
        from torch._inductor import aoti_load_package

        stamp(times, "import_loader", since)
        runner = aoti_load_package(str(work / f"{name}.pt2"))
        call = runner
    else:
        runner = torch._C._aoti.AOTIModelPackageLoader(
            str(work / f"{name}.pt2"), "model", False, 1, 0
        )
        stamp(times, "import_loader", since)

        def call(*args):
            return runner.run(list(args))[0]

    stamp(times, "load_package", since)
    weights = {
        id(layer): layer_weights(layer, qkv)
        for layer, qkv in zip(model.layers, engine._qkv, strict=True)
    }
    spans = torch.empty(1024, device="cuda", dtype=torch.int8)

    def layer_fn(x, layer, weight, bias, rotary, cu_seqlens, max_len):
        return call(x, rotary, cu_seqlens, spans[:max_len], *weights[id(layer)])

    engine._layer = layer_fn
    engine.compiled = True
    engine.embed([b"W" * 130, b"G" * 40])
    torch.cuda.synchronize()
    stamp(times, "first_call", since)
    engine._warm_up()
    stamp(times, "warm_up", since)
    sequences = workload(30000)
    times["steady_tok_s"] = round(steady(engine, sequences))
    aot = engine.embed(sequences[:500])
    cos = (aot * eager).sum(-1) / np.linalg.norm(aot, axis=-1) / np.linalg.norm(eager, axis=-1)
    times["min_cos_vs_eager"] = float(cos.min())
    ref = work / f"{name}-compiled.npy"
    if ref.exists():
        c = np.load(ref)
        cos = (aot * c).sum(-1) / np.linalg.norm(aot, axis=-1) / np.linalg.norm(c, axis=-1)
        times["min_cos_vs_compiled"] = float(cos.min())
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "mode", choices=["imports", "compiled", "aot-build", "aot-run", "aot-run-c"]
    )
    parser.add_argument("--model", default="esm2_t33_650M_UR50D")
    parser.add_argument("--work", type=Path, default=Path("/tmp/aot"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.mode == "imports":
        result = imports()
    elif args.mode == "compiled":
        result = compiled(args.model, args.work)
    elif args.mode == "aot-build":
        result = aot_build(args.model, args.work)
    else:
        result = aot_run(args.model, args.work, "python" if args.mode == "aot-run" else "c")
    result["process_total"] = round(time.perf_counter() - T0, 3)
    print(json.dumps({"mode": args.mode, "model": args.model, **result}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
