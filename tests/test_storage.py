"""The storage layer: what is a URL, storage options that never show a credential, and
compare-and-swap on an object's version (against moto's S3 server on 127.0.0.1)."""

from __future__ import annotations

import fsspec
import pytest

from tests.servers import s3_server
from virnuc_dask.errors import VirnucError
from virnuc_dask.storage.remote import Remote, VersionChanged
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
