"""Model loading: fair-esm's checkpoint format, checked on the driver, loaded fast and safely."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY
from virnuc_dask.errors import VirnucError, command_line_spelling
from virnuc_dask.model import weights
from virnuc_dask.model.checkpoint import read_checkpoint, resolve_weights
from virnuc_dask.model.loading import load_model
from virnuc_dask.model.registry import MODELS, expected_shapes
from virnuc_dask.model.weights import WeightsSource, hub_checkpoint, hub_dir

ROOT = Path(__file__).resolve().parents[1]


def write_fair_esm_checkpoint(
    model: torch.nn.Module, path, *, regression: bool = True, dtype: torch.dtype | None = None
) -> None:
    """Save ``model`` the way fair-esm's published ESM-2 files are laid out.

    ``dtype`` stores the floating tensors in another precision (fair-esm loads them as fp32).
    """
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("contact_head.regression"):
            continue
        prefix = "encoder." if name.startswith("lm_head") else "encoder.sentence_encoder."
        state[prefix + name] = tensor.clone() if dtype is None else tensor.to(dtype)
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


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    """A private digest cache, so tests neither read nor write the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "virnuc-dask" / "digests.json"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A private torch hub directory (worker processes inherit it through TORCH_HOME)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub"


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A checkpoint of the tiny architecture (seed-3 random weights) and its model."""
    model = load_model(resolve_weights(TINY, random_weights=True, seed=3))
    path = tmp_path / "tiny.pt"
    write_fair_esm_checkpoint(model, path)
    return path, model


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
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_missing_weights_say_where_to_put_them(hub):
    with pytest.raises(VirnucError) as error:
        resolve_weights("esm2_t33_650M_UR50D")
    message = str(error.value)
    assert str(hub / "checkpoints" / "esm2_t33_650M_UR50D.pt") in message
    assert "esm2_t33_650M_UR50D.pt" in message and "random_weights=True" in message
    with command_line_spelling(), pytest.raises(VirnucError, match="--random-weights"):
        resolve_weights("esm2_t33_650M_UR50D")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_needing_arbitrary_unpickling_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": exploit}, "model": {}}, path)
    with pytest.raises(VirnucError, match="refusing to load .*system"):
        read_checkpoint(path)
    with pytest.raises(VirnucError, match="refusing to load"):
        resolve_weights(TINY, checkpoint=path)
    assert not marker.exists()


def test_checkpoint_of_another_architecture_is_refused_on_the_driver(tmp_path, tiny_checkpoint):
    path, _ = tiny_checkpoint
    with pytest.raises(VirnucError, match="2-layer, 64-wide .* pass model=esm2_t2_tiny"):
        resolve_weights("esm2_t6_8M_UR50D", checkpoint=path)
    with command_line_spelling(), pytest.raises(VirnucError, match="pass --model esm2_t2_tiny"):
        resolve_weights("esm2_t6_8M_UR50D", checkpoint=path)


def _truncated(path: Path, _) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path, _) -> None:
    path.write_bytes(os.urandom(4096))


def _empty(path: Path, _) -> None:
    path.write_bytes(b"")


def _plain_pickle(path: Path, _) -> None:
    path.write_bytes(pickle.dumps({"cfg": {}, "model": {}}))


def _not_fair_esm(path: Path, model) -> None:
    torch.save(model.state_dict(), path)  # a bare state dict, no configuration


def _missing_tensor(path: Path, _) -> None:
    data = read_checkpoint(path, mmap=False)
    del data["model"]["encoder.sentence_encoder.layers.1.fc1.weight"]
    torch.save(data, path)


def _wrong_shape(path: Path, _) -> None:
    data = read_checkpoint(path, mmap=False)
    data["model"]["encoder.sentence_encoder.layers.0.fc2.bias"] = torch.zeros(65)
    torch.save(data, path)


def _unknown_tensor(path: Path, _) -> None:
    data = read_checkpoint(path, mmap=False)
    data["model"]["encoder.sentence_encoder.layers.2.fc1.weight"] = torch.zeros(256, 64)
    torch.save(data, path)


def _no_configuration(path: Path, _) -> None:
    data = read_checkpoint(path, mmap=False)
    data["cfg"] = {"model": argparse.Namespace(encoder_layers=2)}
    torch.save(data, path)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_truncated, "truncated or corrupt.*download it again"),
        (_garbage, "not a PyTorch checkpoint"),
        (_empty, "not a PyTorch checkpoint"),
        (_plain_pickle, "not a PyTorch checkpoint"),
        (_not_fair_esm, "not an ESM-2 checkpoint in fair-esm's format"),
        (_missing_tensor, "1 tensors missing \\(layers.1.fc1.weight\\)"),
        (_wrong_shape, "layers.0.fc2.bias \\(65,\\) instead of \\(64,\\)"),
        (_unknown_tensor, "unknown tensors \\(layers.2.fc1.weight\\)"),
        (_no_configuration, "no ESM-2 configuration"),
    ],
)
def test_bad_checkpoint_is_refused_on_the_driver_without_building_a_model(
    tiny_checkpoint, monkeypatch, spoil, message
):
    path, model = tiny_checkpoint
    spoil(path, model)
    import esm

    def no_model(*args, **kwargs):
        raise AssertionError("resolve_weights built a model")

    monkeypatch.setattr(esm, "ESM2", no_model)
    with pytest.raises(VirnucError, match=message) as error:
        resolve_weights(TINY, checkpoint=path)
    assert str(path) in str(error.value)


def test_directory_as_checkpoint_is_named_a_directory(tmp_path):
    with pytest.raises(VirnucError, match="is a directory; give the .pt file"):
        resolve_weights(TINY, checkpoint=tmp_path)


def test_expected_shapes_are_fair_esms(tmp_path):
    import esm

    for spec in MODELS.values():
        with torch.device("meta"):
            model = esm.ESM2(spec.num_layers, spec.embed_dim, spec.attention_heads)
        actual = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        assert expected_shapes(spec) == actual, spec.name


def _fair_esm_model(path: Path) -> torch.nn.Module:
    """fair-esm's own loader on the same files (read whole, no memory map)."""
    import esm

    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(path, weights_only=True)
        regression = torch.load(weights.regression_file(path), weights_only=True)
    model, _ = esm.pretrained.load_model_and_alphabet_core("esm2_t6_8M_UR50D", data, regression)
    return model.eval()


def _outputs(model: torch.nn.Module) -> dict:
    convert = model.alphabet.get_batch_converter()
    _, _, tokens = convert([("a", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"), ("b", "MKVLA")])
    with torch.inference_mode():
        out = model(tokens, repr_layers=range(model.num_layers + 1), return_contacts=True)
    return {
        "logits": out["logits"],
        "contacts": out["contacts"],
        **{f"layer{k}": v for k, v in out["representations"].items()},
    }


@pytest.mark.parametrize("stored", [torch.float32, torch.float16])
def test_fast_load_is_bitwise_fair_esms_load(tmp_path, monkeypatch, stored):

    original = load_model(resolve_weights("esm2_t6_8M_UR50D", random_weights=True, seed=4))
    path = tmp_path / "esm2_t6_8M_UR50D.pt"
    write_fair_esm_checkpoint(original, path, dtype=stored)
    expected = _fair_esm_model(path)

    drawn = []

    def recording(name):
        original = getattr(torch.nn.init, name)

        def draw(tensor, *args, **kwargs):
            drawn.append(name)
            return original(tensor, *args, **kwargs)

        return draw

    for name in ("_no_grad_normal_", "_no_grad_uniform_", "_no_grad_fill_", "_no_grad_zero_"):
        monkeypatch.setattr(torch.nn.init, name, recording(name))
    loaded = load_model(resolve_weights("esm2_t6_8M_UR50D", checkpoint=path))
    # No random initialisation: nothing is drawn for weights the file replaces.
    assert drawn == []
    assert _fair_esm_model(path) is not None and drawn  # the recording does see fair-esm's
    assert loaded.embed_tokens.weight is loaded.lm_head.weight
    reference = expected.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == reference[name].dtype and torch.equal(tensor, reference[name])
    got, want = _outputs(loaded), _outputs(expected)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_fast_load_casts_and_places_the_weights(tiny_checkpoint):
    path, original = tiny_checkpoint
    source = resolve_weights(TINY, checkpoint=path)
    loaded = load_model(source, device="cpu", dtype=torch.bfloat16)
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.bfloat16}
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    random = load_model(resolve_weights(TINY, random_weights=True, seed=3), dtype=torch.float16)
    assert torch.equal(random.layers[0].fc1.weight, original.layers[0].fc1.weight.half())


def test_rotary_frequencies_missing_from_the_file_are_recreated(tiny_checkpoint):
    path, original = tiny_checkpoint
    data = read_checkpoint(path, mmap=False)
    data["model"] = {k: v for k, v in data["model"].items() if not k.endswith("inv_freq")}
    torch.save(data, path)
    loaded = load_model(resolve_weights(TINY, checkpoint=path))
    for mine, theirs in zip(loaded.layers, original.layers, strict=True):
        assert torch.equal(mine.self_attn.rot_emb.inv_freq, theirs.self_attn.rot_emb.inv_freq)


def test_checkpoint_changed_after_resolve_is_refused(tiny_checkpoint):
    path, original = tiny_checkpoint
    source = resolve_weights(TINY, checkpoint=path)
    other = load_model(resolve_weights(TINY, random_weights=True, seed=9))
    write_fair_esm_checkpoint(other, path)
    with pytest.raises(VirnucError, match="changed since the run started") as error:
        load_model(source)
    assert str(path) in str(error.value)


def test_digest_is_computed_once_per_file(tiny_checkpoint, monkeypatch, digest_cache):
    path, _ = tiny_checkpoint
    hashed = []
    real = weights.file_sha256
    monkeypatch.setattr(weights, "file_sha256", lambda p: hashed.append(p) or real(p))
    first = resolve_weights(TINY, checkpoint=path)
    second = resolve_weights(TINY, checkpoint=path)
    load_model(second)
    assert first == second and len(hashed) == 1
    cached = json.loads(digest_cache.read_text())
    assert cached[str(path.resolve())]["sha256"] == first.sha256


def test_unwritable_or_broken_cache_never_fails(tiny_checkpoint, monkeypatch, tmp_path):
    path, _ = tiny_checkpoint
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert resolve_weights(TINY, checkpoint=path).sha256 == weights.file_sha256(path)
    broken = tmp_path / "broken" / "virnuc-dask"
    broken.mkdir(parents=True)
    (broken / "digests.json").write_text("{not json")
    monkeypatch.setenv("XDG_CACHE_HOME", str(broken.parent))
    assert resolve_weights(TINY, checkpoint=path).sha256 == weights.file_sha256(path)


def test_weights_identity_names_the_model(tiny_checkpoint, tmp_path):
    tiny = resolve_weights(TINY, random_weights=True, seed=0)
    small = resolve_weights("esm2_t6_8M_UR50D", random_weights=True, seed=0)
    assert tiny.identity() != small.identity()
    assert TINY in tiny.describe() and "random" in tiny.describe()
    assert tiny.identity() == {"model": TINY, "weights": "random", "seed": 0}

    path, _ = tiny_checkpoint
    source = resolve_weights(TINY, checkpoint=path)
    assert TINY in source.describe() and source.sha256 in source.describe()
    assert source.identity() == {"model": TINY, "weights": f"sha256:{source.sha256}"}
    moved = tmp_path / "elsewhere" / "tiny.pt"
    moved.parent.mkdir()
    moved.write_bytes(path.read_bytes())
    assert resolve_weights(TINY, checkpoint=moved).identity() == source.identity()
    assert isinstance(source, WeightsSource)


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


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"XDG_CACHE_HOME": "/data/cache"},
        {"TORCH_HOME": "/models/torch"},
        {"TORCH_HOME": "~/torch", "XDG_CACHE_HOME": "/data/cache"},
        {"XDG_CACHE_HOME": "~/xdg"},
        {"TORCH_HOME": ""},
    ],
)
def test_hub_dir_without_torch_is_torchs(env, monkeypatch):
    import torch.hub

    for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hub_dir(dict(os.environ)) == Path(torch.hub.get_dir())
    assert hub_dir() == Path(torch.hub.get_dir())


def test_the_model_modules_do_not_import_torch():
    # Only this module and what it imports: a stand-in package skips the package's
    # __init__, whose other imports are not this module's to answer for.
    code = (
        "import sys, types\n"
        "package = types.ModuleType('virnuc_dask')\n"
        f"package.__path__ = [{str(ROOT / 'virnuc_dask')!r}]\n"
        "sys.modules['virnuc_dask'] = package\n"
        "from virnuc_dask.model import checkpoint, registry, weights\n"
        "name = registry.DEFAULT_MODEL\n"
        "registry.model_spec(name); weights.hub_checkpoint(name)\n"
        "checkpoint.resolve_weights('esm2_t2_tiny', random_weights=True).describe()\n"
        "print(sorted(n for n in sys.modules if n == 'torch' or n.startswith(('torch.', 'esm'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
