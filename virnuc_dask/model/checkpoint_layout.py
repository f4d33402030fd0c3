"""What a ``torch.save`` checkpoint holds, read without importing torch.

The driver checks a checkpoint before any worker starts (configuration, every tensor's name
and shape), but it never computes with the weights: importing torch for that costs seconds
that the user waits for on every command. ``torch.save``'s format is a zip archive holding one
pickle (``data.pkl``) that describes the objects and one uncompressed entry per tensor
storage. :func:`read_layout` unpickles ``data.pkl`` with an allow-list of exactly what
fair-esm's files need, the same list the workers' ``torch.load(weights_only=True)`` enforces,
and turns every tensor into a :class:`TensorLayout` (shape, dtype, where its bytes are),
checked against the size of its storage entry in the archive. No tensor data is read.
"""

from __future__ import annotations

import argparse
import collections
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

from virnuc_dask.errors import VirnucError

# Bytes per element of the storage classes torch.save names (``torch.<Name>Storage``).
_ITEM_SIZES = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
}


@dataclass(frozen=True)
class TensorLayout:
    """One tensor of a checkpoint, described but not read.

    Attributes
    ----------
    shape
        The tensor's shape.
    storage
        The storage class torch.save named, e.g. ``HalfStorage``.
    key
        The storage's entry in the archive (``<archive>/data/<key>``).
    storage_bytes
        Bytes of the whole storage the tensor views (several tensors may share one).
    """

    shape: tuple[int, ...]
    storage: str
    key: str
    storage_bytes: int

    @property
    def is_floating_point(self) -> bool:
        """Whether the tensor holds floating-point numbers."""
        return self.storage in {"DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage"}


@dataclass(frozen=True)
class _Storage:
    name: str
    key: str
    elements: int


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> TensorLayout:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    size = tuple(int(n) for n in size)
    # The last element a strided view touches must lie inside its storage.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else 0
    if math.prod(size) and last >= storage.elements:
        raise pickle.UnpicklingError(f"tensor of storage {storage.key} runs past it")
    return TensorLayout(
        size, storage.name, storage.key, storage.elements * _ITEM_SIZES[storage.name]
    )


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
}


class _Unpickler(pickle.Unpickler):
    """Unpickle ``data.pkl`` with the allow-list; tensors become :class:`TensorLayout`."""

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _ITEM_SIZES:
            return name
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
        return allowed

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, name, key, _location, elements = pid
        if name not in _ITEM_SIZES:
            raise pickle.UnpicklingError(f"unknown storage class {name!r}")
        return _Storage(name, str(key), int(elements))


def is_zip_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is in ``torch.save``'s zip format (the only one read here)."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def read_layout(path: str | Path) -> object:
    """Read the objects of a zip-format checkpoint, tensors as :class:`TensorLayout`.

    Raises
    ------
    VirnucError
        The archive is truncated or corrupt, a storage entry is missing or too short, or the
        pickle needs a class outside the allow-list (tensors, plain containers,
        ``argparse.Namespace``).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(names) != 1:
                raise pickle.UnpicklingError("no single data.pkl in the archive")
            prefix = names[0][: -len("data.pkl")]
            unpickler = _Unpickler(archive.open(names[0]))
            data = unpickler.load()
            sizes = {info.filename: info.file_size for info in archive.infolist()}
    except pickle.UnpicklingError as error:
        unsafe = str(error)
        if unsafe.startswith("GLOBAL "):
            raise VirnucError(
                f"refusing to load {path}: it needs {unsafe.split()[1]}, outside the allow-list "
                "of a fair-esm checkpoint (tensors, containers, argparse.Namespace)"
            ) from None
        raise _corrupt(path, unsafe) from None
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError) as error:
        raise _corrupt(path, str(error) or type(error).__name__) from None
    for layout in _tensors(data):
        entry = f"{prefix}data/{layout.key}"
        if entry not in sizes:
            raise _corrupt(path, f"storage {layout.key} is missing")
        if sizes[entry] < layout.storage_bytes:
            raise _corrupt(
                path, f"storage {layout.key} holds {sizes[entry]} of {layout.storage_bytes} bytes"
            )
    return data


def _tensors(data: object):
    """Every :class:`TensorLayout` inside ``data`` (dicts, lists, tuples, namespaces)."""
    if isinstance(data, TensorLayout):
        yield data
    elif isinstance(data, dict):
        for value in data.values():
            yield from _tensors(value)
    elif isinstance(data, list | tuple):
        for value in data:
            yield from _tensors(value)
    elif isinstance(data, argparse.Namespace):
        yield from _tensors(vars(data))


def _corrupt(path: Path, detail: str) -> VirnucError:
    return VirnucError(
        f"cannot read checkpoint {path}: it is truncated or corrupt ({detail}); download it again"
    )
