"""Random-weight checkpoints in fair-esm's format, so that jobs load their model by name.

Decisions:

- Weights are loaded by name through the real loading path, not ``--random-weights``: the
  checkpoints are written in fair-esm's format (``{"cfg": {"model": Namespace}, "model":
  state_dict}`` and ``NAME-contact-regression.pt``) into ``$TORCH_HOME/hub/checkpoints``, and
  every job runs with that ``TORCH_HOME``.
- They are drawn on the GPU when there is one (a 3B model in seconds instead of the CPU's
  minutes), seeded, and stored in fp16 like the published files (3B: 5.7 GB).
- The checkpoint digest the tool computes once per file is computed here, with the jobs'
  ``XDG_CACHE_HOME``: a user pays it once per downloaded file, not per run, and setup reports
  how long it took.
- ``child_checkpoint`` imports torch, so benchmarks run it in a child process
  (``common.children.child``): the process that starts the jobs never holds a GPU.
"""

from __future__ import annotations

import argparse
import time


def child_checkpoint(model: str, seed: int) -> dict:
    """Write random-weight checkpoints of ``model`` into ``$TORCH_HOME/hub/checkpoints``.

    fair-esm's ``ESM2`` is built on the GPU when there is one, then every parameter is drawn
    again from a seeded generator (normal(0, 0.02) weights, layer norms 1, biases 0), so the
    weights are the same on every machine of one kind and cost seconds even for 3B. Saved in
    fp16 and fair-esm's layout (``encoder.sentence_encoder.`` prefixes, the contact regression
    in its own file) through a temporary name, so a killed setup never leaves a half file.
    Reused when both files are there. Then the tool's digest of the file is computed once.

    Parameters
    ----------
    model
        A fair-esm model name, e.g. ``esm2_t36_3B_UR50D``.
    seed
        Seed of the weights.

    Returns
    -------
    dict
        ``model``, ``reused``, ``bytes``, ``digest_seconds``, and where the files were written
        ``build_seconds``, ``save_seconds`` and ``device``.
    """
    import esm
    import torch

    from virnuc_dask.model.registry import model_spec
    from virnuc_dask.model.weights import checkpoint_digest, hub_checkpoint, regression_file

    path = hub_checkpoint(model)
    regression = regression_file(path)
    result: dict = {"model": model, "reused": path.is_file() and regression.is_file()}
    if not result["reused"]:
        spec = model_spec(model)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        started = time.perf_counter()
        torch.manual_seed(seed)
        with torch.device(device), torch.no_grad():
            net = esm.ESM2(
                num_layers=spec.num_layers,
                embed_dim=spec.embed_dim,
                attention_heads=spec.attention_heads,
                alphabet="ESM-1b",
                token_dropout=True,
            )
            for name, param in net.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                elif "layer_norm" in name:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02)
        # Stored in fp16, as fair-esm publishes these files (3B: 5.7 GB).
        state = {
            name: t.detach().to("cpu", torch.float16 if t.is_floating_point() else t.dtype)
            for name, t in net.state_dict().items()
        }
        del net
        result["build_seconds"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        cfg = argparse.Namespace(
            encoder_layers=spec.num_layers,
            encoder_embed_dim=spec.embed_dim,
            encoder_attention_heads=spec.attention_heads,
            token_dropout=True,
        )
        head = {k: v for k, v in state.items() if k.startswith("contact_head.regression")}
        body = {
            ("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k: v
            for k, v in state.items()
            if k not in head
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        # The model file goes last: once it is there, both files are whole.
        for target, content in (
            (regression, {"model": head}),
            (path, {"cfg": {"model": cfg}, "model": body}),
        ):
            partial = target.with_name(target.name + ".partial")
            torch.save(content, partial)
            partial.replace(target)
        result["save_seconds"] = round(time.perf_counter() - started, 2)
        result["device"] = str(device)
    result["bytes"] = path.stat().st_size
    started = time.perf_counter()
    checkpoint_digest(path)
    result["digest_seconds"] = round(time.perf_counter() - started, 2)
    return result
