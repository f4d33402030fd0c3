"""The input corpus (``tests/corpus.py``) against the index and the real command line.

Accepted inputs go through :func:`build_index` and :func:`read_sequences` (no cluster: what a
worker reads is what the index says). Refused inputs go through ``virnuc-dask embed`` in a
subprocess: exit status 2, one ``virnuc-dask: error:`` line naming the file and the line or id,
no traceback, nothing left at the output path; and, in process with every way of starting a
cluster recorded (and stopped), they must fail before any cluster starts.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.corpus import ACCEPTS, CASES, ERRORS, Built, Case
from virnuc_dask.cli import main
from virnuc_dask.errors import VirnucError
from virnuc_dask.inputs import build_index, read_sequences

MODEL_FLAGS = ["--model", "esm2_t2_tiny", "--random-weights", "--workers", "1"]
ROOT = Path(__file__).resolve().parent.parent


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _entry_point() -> list[str]:
    """The installed ``virnuc-dask`` script of this interpreter's environment."""
    script = Path(sys.executable).with_name("virnuc-dask")
    if not script.exists():
        script = Path(shutil.which("virnuc-dask") or "virnuc-dask")
    return [str(script)]


# Root reads every file whatever its mode, so an unreadable-file case runs the command line as
# an unprivileged user: the same ``main()`` as the script, imported while still root (the
# interpreter may live where that user cannot read), then privileges are dropped for good.
_AS_NOBODY = textwrap.dedent(
    """
    import difflib, os, sys
    import virnuc_dask.cli, virnuc_dask.cluster.local, virnuc_dask.cluster.task
    import virnuc_dask.model.loading, virnuc_dask.run.embed, virnuc_dask.storage.paths
    import virnuc_dask.run.workdir, virnuc_dask.output
    uid, gid = int(os.environ.pop("CORPUS_UID")), int(os.environ.pop("CORPUS_GID"))
    os.setgroups([]); os.setgid(gid); os.setuid(uid)
    sys.argv[0] = "virnuc-dask"
    sys.exit(virnuc_dask.cli.main())
    """
)


def _shown(path: str) -> str:
    """How a message shows a path (quoted when it holds line breaks or other controls)."""
    return path if path.isprintable() else repr(path)


def _case_folder(case: Case, base: Path) -> Path:
    if case.unprivileged and os.geteuid() == 0:
        # tmp_path's parents are private to root: use a folder the unprivileged user can enter.
        folder = Path(tempfile.mkdtemp(prefix=f"corpus-{case.name}-"))
        folder.chmod(0o777)
    else:
        folder = base / case.name
        folder.mkdir()
    (folder / "out").mkdir()
    (folder / "out").chmod(0o777)
    return folder


def _run_cli(case: Case, folder: Path) -> tuple[Built, str, subprocess.CompletedProcess]:
    built = case.build(folder)
    output = built.output or str(folder / "out" / "out.h5")
    args = ["embed", *built.inputs, "-o", output, *MODEL_FLAGS, *case.cli_flags()]
    env = dict(os.environ)
    if case.unprivileged and os.geteuid() == 0:
        uid, gid = _nobody()
        env.update(CORPUS_UID=str(uid), CORPUS_GID=str(gid), HOME=str(folder))
        command = [sys.executable, "-c", _AS_NOBODY, *args]
    else:
        command = [*_entry_point(), *args]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=folder, env=env, timeout=300
    )
    return built, output, result


@pytest.fixture(scope="module")
def cli_runs(request, tmp_path_factory) -> dict[str, Future]:
    """The selected error cases through the real command line, all started at once: each is a
    cold start of the command, so running them side by side saves most of the wall time."""
    selected = {
        item.callspec.params["case"].name
        for item in request.session.items
        if item.originalname == "test_refused_through_the_command_line"
    }
    cases = [case for case in ERRORS if case.name in selected]
    base = tmp_path_factory.mktemp("corpus-cli")
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1))
    folders = {case.name: _case_folder(case, base) for case in cases}
    futures = {case.name: pool.submit(_run_cli, case, folders[case.name]) for case in cases}
    yield futures
    pool.shutdown(wait=True)
    for case in cases:
        if case.unprivileged:
            shutil.rmtree(folders[case.name], ignore_errors=True)


def test_corpus_is_large_and_consistent():
    names = [case.name for case in CASES]
    assert len(CASES) >= 30
    assert len(set(names)) == len(names)
    for case in CASES:
        assert case.expect in ("error", "accept"), case.name
        if case.expect == "error":
            assert case.message and not case.records, case.name
        else:
            assert case.records and not case.message, case.name


def test_docs_mirror_the_corpus():
    """docs/input.md has one table row per corpus case."""
    docs = (ROOT / "docs" / "input.md").read_text()
    missing = [case.name for case in CASES if f"`{case.name}`" not in docs]
    assert not missing, f"cases missing from docs/input.md: {missing}"


@pytest.mark.parametrize("case", ERRORS, ids=lambda c: c.name)
def test_refused_through_the_command_line(case: Case, cli_runs):
    built, output, result = cli_runs[case.name].result()
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("virnuc-dask: error: "), line
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == "", "the run went on past validation (dashboard printed?)"
    assert case.message in line, line
    for path in built.named:
        assert _shown(path) in line, line
    if case.where:
        assert case.where in line, line
    assert not os.path.exists(output)
    assert not os.path.exists(output + ".work")
    out = Path(output).parent
    if out.is_dir():
        assert not list(out.iterdir()), "files left behind"


@pytest.fixture
def cluster_starts(monkeypatch) -> list[str]:
    """Every way a run gets a cluster, recorded by name when called, and stopped there.

    A local run starts its cluster through ``start_local_cluster`` in a thread while it
    indexes large inputs, and that thread keeps any error for later: the record, not an
    exception, is what a test checks. ``LocalCluster.__init__`` (``LocalCUDACluster`` is one)
    catches any other path to a local cluster; ``connect``, a scheduler's.
    """
    import distributed

    import virnuc_dask.cluster.existing
    import virnuc_dask.cluster.local

    starts: list[str] = []

    def stopped(name):
        def start(*args, **kwargs):
            starts.append(name)
            raise RuntimeError(f"{name} was called for an input that must be refused")

        return start

    monkeypatch.setattr(
        virnuc_dask.cluster.local, "start_local_cluster", stopped("start_local_cluster")
    )
    monkeypatch.setattr(virnuc_dask.cluster.existing, "connect", stopped("connect"))
    monkeypatch.setattr(distributed.LocalCluster, "__init__", stopped("LocalCluster"))
    return starts


@pytest.mark.parametrize("case", [c for c in ERRORS if not c.unprivileged], ids=lambda c: c.name)
def test_refused_before_any_cluster_starts(case: Case, tmp_path, cluster_starts):
    (tmp_path / "out").mkdir()
    built = case.build(tmp_path)
    output = built.output or str(tmp_path / "out" / "out.h5")
    args = ["embed", *built.inputs, "-o", output, *MODEL_FLAGS, *case.cli_flags()]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "virnuc-dask: error: " in result.stderr
    assert case.message in result.stderr
    assert cluster_starts == [], "a cluster was started for an input that must be refused"


def test_unreadable_input_in_process(tmp_path):
    """The index's own message for an unreadable file (as root: with an unprivileged euid)."""
    case = next(c for c in ERRORS if c.unprivileged)
    folder = Path(tempfile.mkdtemp(prefix="corpus-unreadable-"))
    try:
        folder.chmod(0o755)
        built = case.build(folder)
        uid, gid = _nobody()
        root = os.geteuid() == 0
        if root:
            os.setegid(gid)
            os.seteuid(uid)
        try:
            with pytest.raises(VirnucError) as error:
                build_index(built.inputs)
        finally:
            if root:
                os.seteuid(0)
                os.setegid(0)
        assert case.message in str(error.value)
        assert built.inputs[0] in str(error.value)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("case", ACCEPTS, ids=lambda c: c.name)
def test_accepted(case: Case, tmp_path):
    built = case.build(tmp_path)
    staging = tmp_path / "staging"
    index = build_index(built.inputs, staging, **case.options)
    expected_ids = [ident for ident, _ in case.records]
    expected = [sequence for _, sequence in case.records]
    assert index.ids() == expected_ids
    assert index.length.tolist() == [len(s) for s in expected]
    # Read back in a scrambled order, as a worker would read a length-sorted chunk.
    rows = np.random.default_rng(0).permutation(len(index))
    assert read_sequences(index, rows) == [expected[r] for r in rows]
    if staging.exists():
        assert not list(staging.glob("*.partial"))


def test_million_one_residue_sequences(tmp_path):
    """One million records index with bounded memory, measured in a fresh process.

    On Linux the peak is ``VmHWM`` after a reset (``ru_maxrss`` would start at pytest's own
    peak, inherited through ``fork`` + ``exec``); elsewhere, tracemalloc's peak.
    """
    n = 1_000_000
    path = tmp_path / "million.fa"
    path.write_bytes(b"".join(b">s%d\n%c\n" % (i, b"ACDEFGHIKL"[i % 10]) for i in range(n)))
    script = textwrap.dedent(
        """
        import json, os, sys, time, tracemalloc
        import numpy as np
        from virnuc_dask.inputs import build_index, read_sequences

        def status(field):
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024

        proc = os.path.exists("/proc/self/clear_refs")
        if proc:
            before = status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # restart VmHWM from the current RSS
        else:
            tracemalloc.start()
        started = time.perf_counter()
        index = build_index([sys.argv[1]])
        seconds = time.perf_counter() - started
        if proc:
            grown = status("VmHWM") - before
        else:
            grown = tracemalloc.get_traced_memory()[1] / 2**20
        rows = np.array([0, 1, 123_457, 999_999])
        print(json.dumps({
            "grown_mb": grown, "seconds": seconds, "n": len(index),
            "lengths": int(index.length.sum()), "ids": index.ids(rows),
            "sequences": [s.decode() for s in read_sequences(index, rows)],
        }))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
    )
    report = json.loads(result.stdout)
    assert report["n"] == n
    assert report["lengths"] == n
    assert report["ids"] == ["s0", "s1", "s123457", "s999999"]
    assert report["sequences"] == ["A", "C", "I", "L"]
    assert report["grown_mb"] < 400, report
