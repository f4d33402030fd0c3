"""Model loading: fair-esm's checkpoint format from the hub cache, safely; random weights."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from tests.helpers import TINY
from virnuc_dask.errors import VirnucError
from virnuc_dask.models import MODELS, hub_checkpoint, load_model, read_checkpoint, resolve_weights


def write_fair_esm_checkpoint(model: torch.nn.Module, path, *, regression: bool = True) -> None:
    """Save ``model`` the way fair-esm's published ESM-2 files are laid out."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("contact_head.regression"):
            continue
        prefix = "encoder." if name.startswith("lm_head") else "encoder.sentence_encoder."
        state[prefix + name] = tensor.clone()
    cfg = argparse.Namespace(
        encoder_layers=model.num_layers,
        encoder_embed_dim=model.embed_dim,
        encoder_attention_heads=model.attention_heads,
        token_dropout=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": {"model": cfg}, "model": state}, path)
    if regression:
        head = {
            k: v.clone()
            for k, v in model.state_dict().items()
            if k.startswith("contact_head.regression")
        }
        torch.save({"model": head}, path.with_name(path.stem + "-contact-regression.pt"))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A private torch hub directory (worker processes inherit it through TORCH_HOME)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub"


def test_checkpoint_in_hub_cache_is_loaded_by_name(hub):
    original = load_model(resolve_weights("esm2_t6_8M_UR50D", random_weights=True, seed=5))
    path = hub_checkpoint("esm2_t6_8M_UR50D")
    assert path.parent == hub / "checkpoints"
    write_fair_esm_checkpoint(original, path)

    source = resolve_weights("esm2_t6_8M_UR50D")
    assert source.checkpoint == str(path.resolve()) and len(source.sha256) == 64
    loaded = load_model(source)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_checkpoint_without_contact_regression_loads(tmp_path):
    original = load_model(resolve_weights(TINY, random_weights=True, seed=1))
    path = tmp_path / "my_model.pt"
    write_fair_esm_checkpoint(original, path, regression=False)
    loaded = load_model(resolve_weights(TINY, checkpoint=path))
    assert torch.equal(loaded.layers[1].fc2.weight, original.layers[1].fc2.weight)


def test_missing_weights_say_where_to_put_them(hub):
    with pytest.raises(VirnucError) as error:
        resolve_weights("esm2_t33_650M_UR50D")
    message = str(error.value)
    assert str(hub / "checkpoints" / "esm2_t33_650M_UR50D.pt") in message
    assert "esm2_t33_650M_UR50D.pt" in message and "--random-weights" in message


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_needing_arbitrary_unpickling_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": exploit}, "model": {}}, path)
    with pytest.raises(VirnucError, match="refusing to load"):
        read_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    tiny = load_model(resolve_weights(TINY, random_weights=True))
    path = tmp_path / "tiny.pt"
    write_fair_esm_checkpoint(tiny, path)
    with pytest.raises(VirnucError, match="pass the matching --model"):
        load_model(resolve_weights("esm2_t6_8M_UR50D", checkpoint=path))


def test_random_weights_depend_only_on_the_seed():
    a = load_model(resolve_weights(TINY, random_weights=True, seed=7))
    b = load_model(resolve_weights(TINY, random_weights=True, seed=7))
    c = load_model(resolve_weights(TINY, random_weights=True, seed=8))
    assert torch.equal(a.layers[0].fc1.weight, b.layers[0].fc1.weight)
    assert not torch.equal(a.layers[0].fc1.weight, c.layers[0].fc1.weight)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(VirnucError, match="esm2_t36_3B_UR50D"):
        resolve_weights("esm3", random_weights=True)


def test_registry_matches_fair_esm_shapes():
    assert MODELS["esm2_t36_3B_UR50D"].embed_dim == 2560
    assert MODELS["esm2_t33_650M_UR50D"].num_layers == 33
