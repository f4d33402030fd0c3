"""The storage layer: what is a URL, storage options that never show a credential, and
compare-and-swap on an object's version (against moto's S3 server on 127.0.0.1)."""

from __future__ import annotations

import os
import time

import fsspec
import numpy as np
import pytest

from tests.servers import s3_server
from virnuc_dask.errors import VirnucError
from virnuc_dask.storage.local import Local
from virnuc_dask.storage.remote import Remote, VersionChanged, place
from virnuc_dask.storage.urls import StorageOptions, is_url, local_path


def test_what_is_a_url():
    assert is_url("s3://bucket/a.fa") and is_url("https://host/a.fa.gz") and is_url("gs://b/x")
    assert not is_url("a.fa") and not is_url("-") and not is_url("/data/x:y.fa")
    assert not is_url("file:///data/a.fa") and local_path("file:///data/a.fa") == "/data/a.fa"


def test_storage_options_hide_their_values(tmp_path):
    options = StorageOptions.of({"key": "AKIA-SECRET-VALUE", "endpoint_url": "http://h:9000"})
    assert "AKIA-SECRET-VALUE" not in repr(options) and "2 options" in repr(options)
    assert options.kwargs()["endpoint_url"] == "http://h:9000"
    # A credential on the command line is refused; in a file it is fine.
    with pytest.raises(VirnucError, match=r"holds a credential \(secret\) in clear text"):
        StorageOptions.parse('{"secret": "s3cr3t", "anon": false}')
    with pytest.raises(VirnucError, match=r"credential \(client_kwargs.aws_session_token\)"):
        StorageOptions.parse('{"client_kwargs": {"aws_session_token": "t"}}')
    path = tmp_path / "options.json"
    path.write_text('{"secret": "s3cr3t"}')
    assert StorageOptions.parse(f"@{path}").kwargs() == {"secret": "s3cr3t"}
    assert StorageOptions.parse('{"anon": true}').kwargs() == {"anon": True}
    with pytest.raises(VirnucError, match="is not valid JSON") as error:
        StorageOptions.parse('{"secret": s3cr3t}')
    assert "s3cr3t" not in str(error.value)
    with pytest.raises(VirnucError, match="must be a JSON object"):
        StorageOptions.parse("[1]")


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server, its endpoint in the environment; yields an s3fs filesystem."""
    with s3_server():
        yield fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True)


def test_writes_and_deletes_on_s3_hold_only_while_the_object_is_the_version_named(s3):
    s3.mkdir("versions")
    remote = Remote("s3://versions/lease")
    assert remote.versioned and remote.create(b"first")
    data, first = remote.read_versioned()
    assert data == b"first" and first
    second = remote.write_if(b"second", first)
    assert second not in (None, first) and remote.read_versioned() == (b"second", second)
    # Another writer's version came between: the write and the delete leave it as it is.
    with pytest.raises(VersionChanged):
        remote.write_if(b"late", first)
    with pytest.raises(VersionChanged):
        remote.unlink_if(first)
    assert remote.read_bytes() == b"second"
    remote.unlink_if(second)
    assert not remote.exists()
    with pytest.raises(VersionChanged, match="is gone"):
        remote.write_if(b"again", second)
    with pytest.raises(VersionChanged, match="is gone"):
        remote.unlink_if(second)
    assert not remote.exists()
    with pytest.raises(FileNotFoundError):
        remote.read_versioned()


def test_a_store_without_versions_writes_and_deletes_plainly():
    remote = Remote("memory://plain/lease")
    remote.write_bytes(b"first")
    assert not remote.versioned and remote.read_versioned() == (b"first", None)
    assert remote.write_if(b"second", "any") is None and remote.read_bytes() == b"second"
    remote.unlink_if("any")
    assert not remote.exists()


# The local twin: the same methods as Remote, with the same meaning, on a local path.


def _places(kind: str, tmp_path):
    """A folder of the kind asked for: a local path, or a URL of fsspec's memory store."""
    if kind == "local":
        return Local(tmp_path / "root")
    return Remote(f"memory://twin-{tmp_path.name}/root")


def test_the_local_twin_has_every_method_of_remote():
    shared = {name for name in dir(Remote) if not name.startswith("_")}
    assert shared - set(dir(Local)) == set()
    for name in ("__truediv__", "__eq__", "__hash__", "__lt__", "__str__"):
        assert getattr(Local, name) is not getattr(object, name, None)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_local_and_remote_places_behave_alike(kind, tmp_path):
    root = _places(kind, tmp_path)
    root.mkdir(parents=True, exist_ok=True)
    a = root / "a.txt"
    assert a.name == "a.txt" and a.parent == root and a.with_name("b.txt") == root / "b.txt"
    assert root.contains(a) and root.contains(root) and not a.contains(root)
    assert not a.exists() and not a.is_symlink()
    assert a.create(b"first") and not a.create(b"second") and a.read_bytes() == b"first"
    assert a.exists() and a.is_file() and not a.is_dir() and root.is_dir()
    a.write_text("again")
    assert a.read_text() == "again"
    assert not a.versioned and a.read_versioned() == (b"again", None)
    assert a.write_if(b"third", None) is None and a.read_bytes() == b"third"
    assert abs(a.modified() - time.time()) < 120
    source = tmp_path / "source.bin"
    source.write_bytes(b"put")
    (root / "sub").mkdir()
    (root / "sub" / "c.bin").put(source)
    with pytest.raises(FileExistsError):
        (root / "sub" / "c.bin").put(source, exclusive=True)
    (root / "sub" / "c.bin").get(tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == b"put"
    assert root.glob("*.txt") == [a] and sorted([root / "b", a]) == [a, root / "b"]
    assert root.files() == ["a.txt", "sub/c.bin"]
    a.unlink_if(None)
    assert not a.exists()
    a.unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        a.unlink()
    root.rmtree()
    assert not root.exists() and root.files() == []
    root.rmtree()  # nothing there: nothing to do


def test_a_local_place_is_a_path_for_the_libraries_that_open_one(tmp_path):
    local = place(tmp_path / "x.npy")
    assert isinstance(local, Local) and local.path == tmp_path / "x.npy"
    assert local.native == tmp_path / "x.npy" and os.fspath(local) == str(tmp_path / "x.npy")
    np.save(local, np.arange(3))
    assert np.load(local).tolist() == [0, 1, 2]
    assert place(local) is local and place(f"file://{tmp_path}/y") == Local(tmp_path / "y")
    remote = place("memory://bucket/x")
    assert isinstance(remote, Remote) and place(remote) is remote and remote.native is remote
    assert is_url(remote) and not is_url(local) and Local(tmp_path) != Remote("memory://t")


def test_a_local_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = Local(tmp_path / "manifest.json")
    target.write_bytes(b"old")
    before = os.stat(target).st_ino
    target.write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.stat(target).st_ino != before  # renamed over
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]
    with pytest.raises(FileNotFoundError):
        Local(tmp_path / "missing" / "x").write_bytes(b"x")


def test_a_local_create_is_exclusive_and_its_sources_are_the_file_itself(tmp_path):
    lock = Local(tmp_path / "lock")
    assert lock.create(b"mine") and not lock.create(b"theirs") and lock.read_bytes() == b"mine"
    assert lock.source() == str(lock) and lock.local_source() == str(lock)


def test_a_remote_local_source_is_a_temporary_copy():
    remote = Remote("memory://sources/shard.h5")
    remote.write_bytes(b"shard bytes")
    with remote.local_source() as copy:
        assert copy.read() == b"shard bytes"
    with remote.source() as opened:
        assert opened.read() == b"shard bytes"
