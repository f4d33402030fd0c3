"""The driver's torch-free reading of a checkpoint agrees with torch's and refuses the same."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from tests.test_models import TINY, write_fair_esm_checkpoint
from virnuc_dask.errors import VirnucError
from virnuc_dask.model.checkpoint import read_checkpoint, resolve_weights
from virnuc_dask.model.checkpoint_layout import TensorLayout, read_layout
from virnuc_dask.model.loading import load_model


@pytest.fixture
def checkpoint(tmp_path):
    model = load_model(resolve_weights(TINY, random_weights=True, seed=2))
    path = tmp_path / "tiny.pt"
    write_fair_esm_checkpoint(model, path, dtype=torch.float16)
    return path


def test_layout_equals_torchs_tensors(checkpoint):
    layout = read_layout(checkpoint)
    loaded = read_checkpoint(checkpoint, mmap=False)
    assert vars(layout["cfg"]["model"]) == vars(loaded["cfg"]["model"])
    assert layout["model"].keys() == loaded["model"].keys()
    for name, tensor in loaded["model"].items():
        described = layout["model"][name]
        assert isinstance(described, TensorLayout)
        assert described.shape == tuple(tensor.shape), name
        assert described.is_floating_point == tensor.is_floating_point(), name


def test_views_sharing_a_storage_are_described(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = tmp_path / "views.pt"
    torch.save({"whole": base, "row": base[1], "column": base[:, 2]}, path)
    layout = read_layout(path)
    assert {k: v.shape for k, v in layout.items()} == {"whole": (3, 4), "row": (4,), "column": (3,)}
    assert len({v.key for v in layout.values()}) == 1


def _rewrite(path, change) -> None:
    """Rewrite the zip archive at ``path``, passing each entry's bytes through ``change``."""
    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for info, data in entries:
            target.writestr(info, change(info.filename, data))


def test_a_short_storage_is_corrupt(checkpoint):
    _rewrite(checkpoint, lambda name, data: data[:-8] if name.endswith("/data/3") else data)
    with pytest.raises(VirnucError, match="truncated or corrupt .*storage 3 holds"):
        read_layout(checkpoint)
    with pytest.raises(VirnucError, match="truncated or corrupt"):
        resolve_weights(TINY, checkpoint=checkpoint)


def test_a_missing_storage_is_corrupt(checkpoint):
    with zipfile.ZipFile(checkpoint) as source:
        entries = [
            (i, source.read(i)) for i in source.infolist() if not i.filename.endswith("/data/0")
        ]
    with zipfile.ZipFile(checkpoint, "w", zipfile.ZIP_STORED) as target:
        for info, data in entries:
            target.writestr(info, data)
    with pytest.raises(VirnucError, match="storage 0 is missing"):
        read_layout(checkpoint)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("true",))


def test_anything_outside_the_allow_list_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": _Exploit()}, "model": {}}, path)
    with pytest.raises(VirnucError, match="refusing to load .*system"):
        read_layout(path)
    torch.save({"cfg": {"model": argparse.Namespace(x=slice(1, 2))}, "model": {}}, path)
    with pytest.raises(VirnucError, match="refusing to load .*slice"):
        read_layout(path)


def test_checking_a_checkpoint_on_the_driver_does_not_import_torch(checkpoint):
    code = (
        "import sys\n"
        "from virnuc_dask.model.checkpoint import resolve_weights\n"
        f"source = resolve_weights({TINY!r}, checkpoint={str(checkpoint)!r})\n"
        "assert len(source.sha256) == 64\n"
        "print(sorted(m for m in ('torch', 'esm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
