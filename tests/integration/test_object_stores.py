"""Object stores: inputs, work directory and outputs at URLs, against real servers.

An S3 API (moto's server) and a web server run on 127.0.0.1 for the module; s3fs and fsspec
talk to them over HTTP as they would to AWS or any web server. Credentials and the endpoint
come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``), as on a real cluster.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import xarray as xr
from distributed import Client

import virnuc_dask
from tests.helpers import (
    CLI,
    TINY,
    random_sequences,
    scheduler_address,
    stop,
    two_worker_cluster,
    write_fasta,
)
from tests.servers import http_server, s3_server
from virnuc_dask.errors import VirnucError

CHUNK_TOKENS = 3_000


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server, its endpoint in the environment; yields an s3fs filesystem."""
    with s3_server():
        yield fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True)


@pytest.fixture(scope="module")
def client(s3):
    """Two worker processes, started once the S3 endpoint is in the environment."""
    with two_worker_cluster() as client:
        yield client


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A plain FASTA file and a gzip one (about 25,000 tokens in all)."""
    folder = tmp_path_factory.mktemp("inputs")
    write_fasta(
        folder / "a.fa", random_sequences(80, 30, 200, seed=51), [f"a{i}" for i in range(80)]
    )
    write_fasta(
        folder / "b.fa", random_sequences(60, 30, 200, seed=52), [f"b{i}" for i in range(60)]
    )
    (folder / "b.fa.gz").write_bytes(gzip.compress((folder / "b.fa").read_bytes()))
    return folder


@pytest.fixture(scope="module")
def local_run(client, inputs, tmp_path_factory):
    """The same run with every path local: what each run at URLs must equal."""
    out = tmp_path_factory.mktemp("local") / "out.h5"
    job = virnuc_dask.prepare(
        [inputs / "a.fa", inputs / "b.fa.gz"],
        out,
        lanes=2,
        model=TINY,
        random_weights=True,
        chunk_tokens=CHUNK_TOKENS,
    )
    job.run(client, progress=False)
    return virnuc_dask.open_embeddings(out).load()


def bucket(s3, name: str) -> str:
    """A new bucket; its URL."""
    s3.mkdir(name)
    return f"s3://{name}"


def assert_equal(ids, values, expected) -> None:
    """Same ids in the same order, and the same vectors to 1e-6."""
    assert list(ids) == list(expected.sequence.values)
    np.testing.assert_allclose(values, expected.embedding.values, rtol=1e-6, atol=1e-7)


def test_a_run_on_s3_equals_the_local_run(s3, client, inputs, local_run, tmp_path, caplog):
    url = bucket(s3, "everything")
    s3.put_file(str(inputs / "a.fa"), "everything/in/a.fa")
    s3.put_file(str(inputs / "b.fa.gz"), "everything/in/b.fa.gz")
    # Options as a Python caller passes them; the key stands for a credential: it must not
    # appear in any file or log line of the run.
    secret = "NOT-A-REAL-KEY-0123"
    with caplog.at_level("DEBUG", logger="virnuc_dask"):
        job = virnuc_dask.prepare(
            [f"{url}/in/a.fa", f"{url}/in/b.fa.gz"],
            f"{url}/out/emb.h5",
            client=client,
            zarr=f"{url}/out/emb.zarr",
            work_dir=f"{url}/work",
            model=TINY,
            random_weights=True,
            chunk_tokens=CHUNK_TOKENS,
            storage_options={"key": secret, "secret": "testing", "endpoint_url": s3_endpoint()},
        )
        assert secret not in repr(job.chunk_job()) and secret not in repr(job)
        local_dir = job.local_dir
        assert job.index.files[0] == f"{url}/in/a.fa"  # read where it is, by range
        assert job.index.files[1] == f"{url}/work/staging/input-0001-b.fa"  # gzip: staged
        path = job.run(client, progress=False)
    assert path == f"{url}/out/emb.h5"
    s3.get_file("everything/out/emb.h5", str(tmp_path / "emb.h5"))
    with virnuc_dask.open_embeddings(tmp_path / "emb.h5") as ds:
        assert_equal(ds.sequence.values, ds.embedding.values, local_run)
        assert secret not in json.dumps({k: str(v) for k, v in ds.attrs.items()})
    assert secret.encode() not in (tmp_path / "emb.h5").read_bytes()
    with xr.open_zarr(f"{url}/out/emb.zarr", storage_options={"anon": False}) as store:
        assert_equal(store.sequence.values, store.embedding.values, local_run)
    # Both outputs read in place through their URLs.
    for output in ("emb.h5", "emb.zarr"):
        with virnuc_dask.open_embeddings(f"{url}/out/{output}") as ds:
            assert_equal(ds.sequence.values, ds.embedding.values, local_run)
    assert secret not in caplog.text
    # The work directory and the driver's local folder are gone; nothing else was written.
    assert sorted(s3.find("everything")) == [
        "everything/in/a.fa",
        "everything/in/b.fa.gz",
        "everything/out/emb.h5",
        *s3.find("everything/out/emb.zarr"),
    ]
    assert not local_dir.exists()


def test_per_residue_outputs_on_s3_hold_the_same_rows(s3, client, inputs, local_run, tmp_path):
    url = bucket(s3, "residues")
    job = virnuc_dask.prepare(
        [inputs / "a.fa"],
        f"{url}/out/emb.h5",
        client=client,
        zarr=f"{url}/out/emb.zarr",
        work_dir=f"{url}/work",
        model=TINY,
        random_weights=True,
        chunk_tokens=CHUNK_TOKENS,
        per_residue=True,
    )
    local_dir = job.local_dir
    job.run(client, progress=False)
    with (
        virnuc_dask.open_embeddings(f"{url}/out/emb.h5") as hdf5,
        virnuc_dask.open_embeddings(f"{url}/out/emb.zarr") as store,
    ):
        hdf5, store = hdf5.load(), store.load()
    # Every residue row alike in both (the store's chunks are the file's); attributes differ
    # only in form (HDF5 reads a one-element ``layers`` back as a number).
    xr.testing.assert_equal(store, hdf5)
    assert store.residue_embedding.attrs == hdf5.residue_embedding.attrs
    assert hdf5.residue_embedding.notnull().all("feature").sum() == hdf5.length.sum()
    expected = local_run.sel(sequence=list(hdf5.sequence.values))
    assert_equal(hdf5.sequence.values, hdf5.embedding.values, expected)
    # Each sequence's rows: the pooled vector is their mean (float16 rows, float32 mean).
    first = virnuc_dask.residues_of(store, "a0").values.astype(np.float32)
    np.testing.assert_allclose(first.mean(0), hdf5.embedding.values[0], atol=2e-3)
    # Only the outputs are left: no partial store, no shards, no local stand-ins.
    assert sorted(s3.find("residues")) == [
        "residues/out/emb.h5",
        *s3.find("residues/out/emb.zarr"),
    ]
    assert not local_dir.exists()


def s3_endpoint() -> str:
    return os.environ["AWS_ENDPOINT_URL"]


def test_a_second_run_on_the_same_s3_work_directory_is_refused(s3, inputs, caplog):
    url = bucket(s3, "locks")
    first = virnuc_dask.prepare([inputs / "a.fa"], f"{url}/out.h5", model=TINY, random_weights=True)
    try:
        holder = json.loads(s3.cat_file("locks/out.h5.work/lock"))
        assert holder["run"] == first.token and holder["expires"] > time.time()
        with pytest.raises(VirnucError, match=f"in use by another run .pid {os.getpid()}"):
            virnuc_dask.prepare([inputs / "a.fa"], f"{url}/out.h5", model=TINY, random_weights=True)
        with pytest.raises(VirnucError, match="work directory s3://locks/out.h5.work is in use"):
            virnuc_dask.prepare(
                [inputs / "a.fa"],
                f"{url}/other.h5",
                work_dir=f"{url}/out.h5.work",
                resume=True,
                model=TINY,
                random_weights=True,
            )
    finally:
        first.finish(success=False)  # nothing computed: the work directory goes too
    assert not s3.find("locks")
    # A lease that was not renewed (its run, on another node, is gone) is taken over.
    s3.pipe_file(
        "locks/out.h5.lock",
        json.dumps({"pid": 1, "host": "elsewhere", "run": "gone", "expires": time.time() - 1}),
    )
    with caplog.at_level("WARNING", logger="virnuc_dask"):
        job = virnuc_dask.prepare(
            [inputs / "a.fa"], f"{url}/out.h5", model=TINY, random_weights=True
        )
    assert "taking over the stale lock s3://locks/out.h5.lock" in caplog.text
    assert json.loads(s3.cat_file("locks/out.h5.lock"))["run"] == job.token
    job.finish(success=False)
    assert not s3.find("locks")


def test_errors_name_the_url_and_the_fix(s3, inputs, tmp_path):
    url = bucket(s3, "errors")
    with pytest.raises(VirnucError, match=f"input {url}/missing.fa does not exist; check the URL"):
        virnuc_dask.prepare(
            [f"{url}/missing.fa"], tmp_path / "o.h5", model=TINY, random_weights=True
        )
    with pytest.raises(
        VirnucError, match=r"gcsfs, which is not installed; pip install 'virnuc-dask\[gcs\]'"
    ):
        virnuc_dask.prepare(["gs://b/a.fa"], tmp_path / "o.h5", model=TINY, random_weights=True)
    with pytest.raises(VirnucError, match="the bucket nowhere does not exist"):
        virnuc_dask.prepare([inputs / "a.fa"], "s3://nowhere/o.h5", model=TINY, random_weights=True)
    assert not list(tmp_path.iterdir())


def test_an_http_input(client, inputs, local_run, tmp_path):
    with http_server(inputs) as base:
        job = virnuc_dask.prepare(
            [f"{base}/a.fa", f"{base}/b.fa.gz"],
            tmp_path / "http.h5",
            lanes=2,
            model=TINY,
            random_weights=True,
            chunk_tokens=CHUNK_TOKENS,
        )
        assert job.index.files[0] == f"{base}/a.fa"
        job.run(client, progress=False)
    with virnuc_dask.open_embeddings(tmp_path / "http.h5") as ds:
        assert_equal(ds.sequence.values, ds.embedding.values, local_run)


@pytest.mark.slow  # a command line of its own (its own cluster); the staging it uses is a pipe's
def test_standard_input_from_a_pipe(inputs, local_run, tmp_path):
    # Both files through one pipe, as `zcat` would give them.
    text = (inputs / "a.fa").read_bytes() + (inputs / "b.fa").read_bytes()
    result = subprocess.run(
        [*CLI, "embed", "-", "-o", str(tmp_path / "stdin.h5"), "--model", TINY,
         "--random-weights", "--workers", "2", "--chunk-tokens", str(CHUNK_TOKENS), "--quiet"],
        input=text,
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    with virnuc_dask.open_embeddings(tmp_path / "stdin.h5") as ds:
        assert_equal(ds.sequence.values, ds.embedding.values, local_run)
        assert json.loads(ds.attrs["inputs"]) == ["-"]


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, "embed", *args, "--model", TINY, "--random-weights",
         "--chunk-tokens", str(CHUNK_TOKENS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )  # fmt: skip


@pytest.mark.slow
def test_driver_killed_then_resumed_on_an_s3_work_directory(s3, inputs, local_run, tmp_path):
    url = bucket(s3, "resume")
    s3.put_file(str(inputs / "a.fa"), "resume/a.fa")
    s3.put_file(str(inputs / "b.fa.gz"), "resume/b.fa.gz")
    args = [f"{url}/a.fa", f"{url}/b.fa.gz", "-o", str(tmp_path / "out.h5")]
    args += ["--work-dir", f"{url}/work", "--workers", "2"]
    proc = _cli(*args, "--quiet")
    try:
        deadline = time.time() + 120
        while len(s3.glob("resume/work/shards/shard-*.h5")) < 3:
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local cluster, at once
        proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    finished = len(s3.glob("resume/work/shards/shard-*.h5"))
    assert finished >= 3 and not (tmp_path / "out.h5").exists()
    resumed = _cli(*args, "--resume")
    try:
        _, stderr = resumed.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(resumed.pid, signal.SIGKILL)
    assert resumed.returncode == 0, stderr[-2000:]
    assert "taking over the stale lock s3://resume/work/lock" in stderr  # same host, pid gone
    reused = int(stderr.split("resume: ")[1].split(" of ")[0])
    assert reused >= 3
    with virnuc_dask.open_embeddings(tmp_path / "out.h5") as ds:
        assert_equal(ds.sequence.values, ds.embedding.values, local_run)
    assert sorted(s3.find("resume")) == ["resume/a.fa", "resume/b.fa.gz"]


@contextlib.contextmanager
def _nodes(tmp_path, count: int):
    """A ``dask scheduler`` and ``count`` ``dask worker`` processes that share nothing.

    Each worker has its own home, working directory, temporary and local directory, none of
    them the driver's; what they share with the driver is the scheduler's address and the
    S3 endpoint and credentials in their environment.
    """
    dask = str(Path(sys.executable).with_name("dask"))
    scheduler_file = tmp_path / "scheduler" / "scheduler.json"
    scheduler_file.parent.mkdir()
    started = [
        subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]  # fmt: skip
    try:
        address = scheduler_address(scheduler_file)
        nodes = []
        for n in range(count):
            node = tmp_path / f"node{n}"
            for sub in ("home", "tmp", "local"):
                (node / sub).mkdir(parents=True)
            env = {**os.environ, "HOME": str(node / "home"), "TMPDIR": str(node / "tmp")}
            env.pop("TORCH_HOME", None)
            started.append(
                subprocess.Popen(
                    [dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                     "--no-dashboard", "--local-directory", str(node / "local")],
                    cwd=node / "home",
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
            nodes.append(node)
        yield scheduler_file, nodes
    finally:
        stop(started)


@pytest.mark.slow
def test_nodes_that_share_only_the_object_store(s3, inputs, local_run, tmp_path):
    url = bucket(s3, "nodes")
    s3.put_file(str(inputs / "a.fa"), "nodes/in/a.fa")
    s3.put_file(str(inputs / "b.fa.gz"), "nodes/in/b.fa.gz")
    driver = tmp_path / "driver"
    (driver / "tmp").mkdir(parents=True)
    with (
        _nodes(tmp_path, 2) as (scheduler_file, nodes),
        Client(scheduler_file=str(scheduler_file)) as client,
    ):
        client.wait_for_workers(2, timeout=60)
        run = _cli(
            f"{url}/in/a.fa",
            f"{url}/in/b.fa.gz",
            "-o", f"{url}/out/emb.h5",
            "--zarr", f"{url}/out/emb.zarr",
            "--work-dir", f"{url}/work",
            "--scheduler-file", str(scheduler_file),
            "--quiet",
            cwd=driver,
            env={**os.environ, "TMPDIR": str(driver / "tmp")},
        )  # fmt: skip
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-2000:]
        # Each worker read the index from the store onto its own disk, and embedded chunks.
        copies = [list((node / "local").rglob("virnuc-dask-runs/*/complete")) for node in nodes]
        assert all(copies), copies
    s3.get_file("nodes/out/emb.h5", str(tmp_path / "emb.h5"))
    with virnuc_dask.open_embeddings(tmp_path / "emb.h5") as ds:
        assert_equal(ds.sequence.values, ds.embedding.values, local_run)
    assert not s3.find("nodes/work") and not list((driver / "tmp").iterdir())


def test_reads_at_a_url_stage_their_peptides_in_the_s3_work_directory(s3, tmp_path):
    from virnuc_dask.inputs import read_sequences

    url = bucket(s3, "reads")
    reads = b">r1\nATGGCCAAATTTGGGCCCAAATTTGGGCCC\n>r2\nATGAAACCCGGGTTTAAACCCGGGTTTAAA\n"
    s3.pipe_file("reads/r.fa.gz", gzip.compress(reads))
    job = virnuc_dask.prepare(
        [f"{url}/r.fa.gz"],
        tmp_path / "r.h5",
        work_dir=f"{url}/work",
        translate="six-frame",
        model=TINY,
        random_weights=True,
    )
    try:
        assert job.index.files == [f"{url}/work/staging/peptides-0000.txt"]
        peptides = read_sequences(job.index, range(len(job.index)), job.storage)
        assert peptides[0] == b"MAKFGPKFGP" and job.index.id(0) == "r1F1"
    finally:
        job.finish(success=False)
    assert sorted(s3.find("reads")) == ["reads/r.fa.gz"]
