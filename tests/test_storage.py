"""The storage layer: what is a URL, and storage options that never show a credential."""

from __future__ import annotations

import pytest

from virnuc_dask.errors import VirnucError
from virnuc_dask.storage import StorageOptions, is_url, local_path


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
