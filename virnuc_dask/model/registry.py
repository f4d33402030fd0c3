"""The ESM-2 models this package knows: fair-esm's names and their shapes.

One small registry maps each fair-esm ESM-2 name to its architecture, so adding a model is one
line in ``_SPECS``. :func:`expected_shapes` computes every tensor's shape from it, which lets
the driver check a checkpoint without building a model (or importing torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from virnuc_dask.errors import VirnucError


@dataclass(frozen=True)
class ModelSpec:
    """The shape of one ESM-2 architecture, as fair-esm builds it.

    Parameters
    ----------
    name
        fair-esm's name of the model.
    num_layers
        Transformer layers.
    embed_dim
        Width of the representations.
    attention_heads
        Attention heads per layer.
    """

    name: str
    num_layers: int
    embed_dim: int
    attention_heads: int


_SPECS = [
    ModelSpec("esm2_t6_8M_UR50D", 6, 320, 20),
    ModelSpec("esm2_t12_35M_UR50D", 12, 480, 20),
    ModelSpec("esm2_t30_150M_UR50D", 30, 640, 20),
    ModelSpec("esm2_t33_650M_UR50D", 33, 1280, 20),
    ModelSpec("esm2_t36_3B_UR50D", 36, 2560, 40),
    ModelSpec("esm2_t48_15B_UR50D", 48, 5120, 40),
    # Not a published model: a 2-layer, 64-wide ESM-2 for tests and smoke runs on small
    # machines, usually with random weights.
    ModelSpec("esm2_t2_tiny", 2, 64, 4),
]


#: Every model name this package knows, mapped to its architecture.
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


#: The model VirNucPro used and the default here.
DEFAULT_MODEL = "esm2_t36_3B_UR50D"


# Tokens of fair-esm's "ESM-1b" alphabet, which every ESM-2 model uses.
_ALPHABET_SIZE = 33


def model_spec(name: str) -> ModelSpec:
    """Return the architecture of a model by its fair-esm name.

    Raises
    ------
    VirnucError
        The name is not in :data:`MODELS`; the message lists the known names.
    """
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(MODELS)
        raise VirnucError(f"unknown model {name!r}; choose one of: {known}") from None


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of fair-esm's ESM-2 of shape ``spec``, named as in its state dict.

    Computed from the shape alone, so the driver checks a checkpoint without building a
    model (tests compare it with fair-esm's own module).
    """
    d, v, heads = spec.embed_dim, _ALPHABET_SIZE, spec.attention_heads
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (v, d)}
    for i in range(spec.num_layers):
        layer = {
            **{f"self_attn.{p}_proj.weight": (d, d) for p in ("k", "v", "q", "out")},
            **{f"self_attn.{p}_proj.bias": (d,) for p in ("k", "v", "q", "out")},
            "self_attn.rot_emb.inv_freq": (d // heads // 2,),
            "self_attn_layer_norm.weight": (d,),
            "self_attn_layer_norm.bias": (d,),
            "fc1.weight": (4 * d, d),
            "fc1.bias": (4 * d,),
            "fc2.weight": (d, 4 * d),
            "fc2.bias": (d,),
            "final_layer_norm.weight": (d,),
            "final_layer_norm.bias": (d,),
        }
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes.update(
        {
            "contact_head.regression.weight": (1, spec.num_layers * heads),
            "contact_head.regression.bias": (1,),
            "emb_layer_norm_after.weight": (d,),
            "emb_layer_norm_after.bias": (d,),
            "lm_head.weight": (v, d),
            "lm_head.bias": (v,),
            "lm_head.dense.weight": (d, d),
            "lm_head.dense.bias": (d,),
            "lm_head.layer_norm.weight": (d,),
            "lm_head.layer_norm.bias": (d,),
        }
    )
    return shapes


def _published() -> set[str]:
    return {name for name in MODELS if name.endswith("UR50D")}
