"""The user's files are safe: nothing deleted or overwritten that the tool did not create.

Each case runs the real command line (or the Python API, for Python's spellings) and checks
both the refusal (exit 2, one line naming the path and the fix) and that the user's files are
intact afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import virnuc_dask
from tests.helpers import CLI, TINY, random_sequences, write_fasta
from virnuc_dask.errors import VirnucError
from virnuc_dask.output import write_shard


@pytest.fixture
def fasta(tmp_path):
    """A small FASTA file (12 sequences)."""
    path = tmp_path / "in.fasta"
    write_fasta(path, random_sequences(12, 20, 80, seed=3))
    return path


def run_cli(*args, env=None, timeout=180) -> subprocess.CompletedProcess:
    """The command line with the tiny model; returns the finished process."""
    return subprocess.run(
        [*CLI, "embed", *map(str, args), "--model", TINY, "--random-weights", "--quiet",
         "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )  # fmt: skip


def refused(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2 with one line on stderr holding every word."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("virnuc-dask: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def user_folder(path: Path) -> Path:
    """A folder of the user's with one file in it."""
    path.mkdir()
    (path / "notes.txt").write_text("precious")
    return path


def intact(folder: Path) -> bool:
    """The user's folder still holds exactly its one file."""
    return [p.name for p in folder.iterdir()] == ["notes.txt"] and (
        folder / "notes.txt"
    ).read_text() == "precious"


@pytest.mark.parametrize("flag", ["--zarr", "--work-dir"])
@pytest.mark.parametrize("resume", [False, True])
def test_a_users_folder_is_refused_and_untouched(flag, resume, fasta, tmp_path):
    folder = user_folder(tmp_path / "results")
    result = run_cli(
        fasta, "-o", tmp_path / "out.h5", flag, folder, *(["--resume"] if resume else [])
    )
    refused(result, str(folder), "nothing in it was touched")
    assert intact(folder)
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.lock").exists()


def test_the_current_folder_as_zarr_is_refused(fasta, tmp_path):
    folder = user_folder(tmp_path / "here")
    result = subprocess.run(
        [*CLI, "embed", str(fasta), "-o", str(tmp_path / "out.h5"), "--zarr", ".", "--model", TINY,
         "--random-weights"],
        capture_output=True, text=True, timeout=120, cwd=folder,
    )  # fmt: skip
    refused(result, "zarr store", "nothing in it was touched")
    assert intact(folder)


def test_output_naming_an_input_is_refused(fasta):
    before = fasta.read_bytes()
    refused(run_cli(fasta, "-o", fasta), "input", "destroy")
    assert fasta.read_bytes() == before


@pytest.mark.parametrize(
    "zarr, words",
    [
        ("out.h5", ["overlap"]),
        ("out.h5.work", ["overlap"]),
        ("out.h5.work/inner.zarr", ["overlap"]),
        ("notes.txt", ["notes.txt"]),
    ],
)
def test_zarr_clashing_with_other_paths_is_refused_before_any_work(fasta, tmp_path, zarr, words):
    (tmp_path / "notes.txt").write_text("precious")
    (tmp_path / zarr).parent.mkdir(exist_ok=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli(fasta, "-o", tmp_path / "out.h5", "--zarr", tmp_path / zarr)
    refused(result, *words)
    assert (tmp_path / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_work_dir_holding_the_output_is_refused(fasta, tmp_path):
    (tmp_path / "w").mkdir()
    refused(
        run_cli(fasta, "-o", tmp_path / "w" / "out.h5", "--work-dir", tmp_path / "w"),
        "overlap",
    )


def test_a_symbolic_link_as_output_is_refused(fasta, tmp_path):
    target = tmp_path / "real.h5"
    target.write_text("not mine")
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    refused(run_cli(fasta, "-o", link), "symbolic link")
    assert target.read_text() == "not mine" and link.is_symlink()


def test_an_existing_output_needs_overwrite_and_stays_until_replaced(fasta, tmp_path):
    out = tmp_path / "out.h5"
    out.write_text("an older result")
    refused(run_cli(fasta, "-o", out), "--overwrite")
    assert out.read_text() == "an older result"
    stale = tmp_path / ".out.h5.0123456789abcdef0123456789abcdef.partial"
    stale.write_text("left by a killed assembly")
    result = run_cli(fasta, "-o", out, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(virnuc_dask.open_embeddings(out).sequence) == 12
    assert not stale.exists()


def test_python_callers_get_python_argument_names(fasta, tmp_path):
    out = tmp_path / "out.h5"
    out.write_text("an older result")
    with pytest.raises(VirnucError, match=r"overwrite=True"):
        virnuc_dask.prepare([fasta], out, model=TINY, random_weights=True)
    work = user_folder(tmp_path / "scratch")
    with pytest.raises(VirnucError, match=r"work_dir=DIR"):
        virnuc_dask.prepare(
            [fasta], tmp_path / "o.h5", model=TINY, random_weights=True, work_dir=work
        )
    assert intact(work)


def test_dask_configuration_sets_the_defaults_and_flags_override_it(fasta, tmp_path):
    env = {**os.environ, "DASK_VIRNUC_DASK__MAX_RESIDUES": "30", "DASK_VIRNUC_DASK__SEED": "4"}
    result = run_cli(fasta, "-o", tmp_path / "a.h5", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    ds = virnuc_dask.open_embeddings(tmp_path / "a.h5")
    assert ds.attrs["max_residues"] == 30 and "seed 4" in ds.attrs["weights"]
    assert bool(ds.truncated.any())
    result = run_cli(fasta, "-o", tmp_path / "b.h5", "--max-residues", "1000", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert virnuc_dask.open_embeddings(tmp_path / "b.h5").attrs["max_residues"] == 1000


def test_a_script_without_a_main_guard_is_told_what_to_do(fasta, tmp_path):
    script = tmp_path / "job.py"
    call = f"virnuc_dask.embed({str(fasta)!r}, {str(tmp_path / 'out.h5')!r}, " \
        f"model={TINY!r}, random_weights=True, workers=1, progress=False)"  # fmt: skip
    script.write_text(f"import virnuc_dask\n{call}\n")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180
    )
    assert result.returncode != 0
    # One line, the first and only one: nothing started, so nothing else speaks.
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"virnuc-dask: error: {script}, line 2: embed() is called at the top")
    assert 'if __name__ == "__main__":' in line
    assert not (tmp_path / "out.h5.lock").exists() and not (tmp_path / "out.h5.work").exists()
    guarded = textwrap.indent(call, "    ")
    script.write_text(f"import virnuc_dask\n\nif __name__ == '__main__':\n{guarded}\n")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_work_dir_with_a_missing_parent_is_one_line(fasta, tmp_path):
    refused(
        run_cli(fasta, "-o", tmp_path / "o.h5", "--work-dir", tmp_path / "no" / "w"),
        "--work-dir folder",
        "does not exist",
    )


def test_work_dir_on_a_read_only_filesystem_is_one_line(fasta, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs root and mount to make a read-only filesystem")
    try:
        refused(
            run_cli(fasta, "-o", tmp_path / "o.h5", "--work-dir", ro / "w"),
            "--work-dir folder",
            "not writable",
        )
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert not (tmp_path / "o.h5.lock").exists()


def test_a_damaged_manifest_on_resume_is_one_line(fasta, tmp_path):
    out = tmp_path / "o.h5"
    job = virnuc_dask.prepare([fasta], out, model=TINY, random_weights=True)
    job.release()
    (job.work_dir / "manifest.json").write_text('{"fingerprint": "ab')
    refused(run_cli(fasta, "-o", out, "--resume"), "manifest", "damaged")


def test_layers_given_twice_are_stored_once(fasta, tmp_path):
    result = run_cli(fasta, "-o", tmp_path / "o.h5", "--layers", "1,1", "--layers", "2,1")
    assert result.returncode == 0, result.stderr[-2000:]
    ds = virnuc_dask.open_embeddings(tmp_path / "o.h5")
    assert list(ds.layer.values) == [1, 2]


@pytest.mark.parametrize(
    "other, said",
    [
        ({"model": "esm2_t6_8M_UR50D", "layers": [2]}, "model=esm2_t2_tiny then, model=esm2_t6"),
        ({"layers": [1]}, "layers=2 then, layers=1 now"),
        ({"seed": 1}, "seed=0 then, seed=1 now"),
    ],
    ids=["another model", "other layers", "other weights"],
)
def test_resume_with_other_settings_is_refused_and_restart_reuses_nothing(
    fasta, tmp_path, other, said
):
    out = tmp_path / "o.h5"
    first = virnuc_dask.prepare([fasta], out, model=TINY, random_weights=True)
    chunk = first.partition.chunks[0]
    rows = first.partition.order[chunk.start : chunk.stop]
    shard = first.work_dir / "shards" / "shard-000000.h5"
    write_shard(
        shard,
        rows=rows,
        ids=first.index.ids(rows),
        embedding=np.zeros((len(rows), 1, 64), dtype=np.float32),
        fingerprint=first.fingerprint,
        layers=[2],
    )
    first.release()
    settings = {"model": TINY, "random_weights": True, **other}
    with pytest.raises(VirnucError, match="1 finished chunk of a run with other") as refused:
        virnuc_dask.prepare([fasta], out, resume=True, **settings)
    assert said in str(refused.value) and shard.exists()
    second = virnuc_dask.prepare([fasta], out, restart=True, **settings)
    try:
        assert second.reused == [] and second.fingerprint != first.fingerprint
        assert not shard.exists()
    finally:
        second.release()


def test_the_work_directory_goes_before_the_locks(fasta, tmp_path, cluster_client, monkeypatch):
    from virnuc_dask.run import workdir

    out = tmp_path / "o.h5"
    seen = []
    original = workdir.remove

    def remove(work):
        seen.append((out.with_name("o.h5.lock").exists(), (work / "lock").exists()))
        original(work)

    monkeypatch.setattr(workdir, "remove", remove)
    job = virnuc_dask.prepare([fasta], out, model=TINY, random_weights=True, lanes=2)
    job.run(cluster_client, progress=False)
    assert seen == [(True, True)]
    assert not out.with_name("o.h5.lock").exists() and not job.work_dir.exists()


def test_an_interrupt_after_the_output_is_in_place_is_a_success(fasta, tmp_path, cluster_client):
    from virnuc_dask.run import execute

    out = tmp_path / "o.h5"
    job = virnuc_dask.prepare([fasta], out, model=TINY, random_weights=True, lanes=2)

    class Late(execute._Watch):
        def finish(self, seconds):
            raise KeyboardInterrupt  # as SIGTERM would, right after the assembly's rename

    original, execute._Watch = execute._Watch, Late
    try:
        assert job.run(cluster_client, progress=False) == out
    finally:
        execute._Watch = original
    with h5py.File(out) as f:
        assert f.attrs["run"] == job.token
    assert not job.work_dir.exists() and not out.with_name("o.h5.lock").exists()


def test_the_output_records_the_run(fasta, tmp_path, cluster_client):
    out = tmp_path / "o.h5"
    job = virnuc_dask.prepare([fasta], out, model=TINY, random_weights=True, lanes=2)
    job.run(cluster_client, progress=False)
    attrs = virnuc_dask.open_embeddings(out).attrs
    assert attrs["run"] == job.token and attrs["fingerprint"] == job.fingerprint
    assert {"torch", "fair-esm", "dask"} <= set(json.loads(attrs["versions"]))
