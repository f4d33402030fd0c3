"""The command line end to end: local cluster, ``dask scheduler`` + ``dask worker``, real data."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

import virnuc_dask
from tests.helpers import (
    CLI,
    EXAMPLE,
    TINY,
    assert_rows_close,
    dask_processes,
    fair_esm_embeddings,
    random_sequences,
    write_fasta,
)
from tests.test_models import write_fair_esm_checkpoint
from virnuc_dask.model.checkpoint import resolve_weights
from virnuc_dask.model.loading import load_model
from virnuc_dask.model.weights import hub_checkpoint


def _example():
    ids, seqs = [], []
    for record in EXAMPLE.read_text().split(">")[1:]:
        header, *lines = record.splitlines()
        ids.append(header.split()[0])
        seqs.append("".join(lines))
    return ids, seqs


def _embed(*args, timeout=300):
    result = subprocess.run(
        [*CLI, "embed", *map(str, args), "--quiet"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_real_proteins_on_the_local_cluster_with_zarr(tmp_path, tiny_model):
    ids, seqs = _example()
    out, store = tmp_path / "proteins.h5", tmp_path / "proteins.zarr"
    _embed(
        EXAMPLE,
        "-o",
        out,
        "--zarr",
        store,
        "--model",
        TINY,
        "--random-weights",
        "--workers",
        "2",
        "--chunk-tokens",
        "1500",
    )
    ds = virnuc_dask.open_embeddings(out).load()
    assert list(ds.sequence.values) == ids
    assert_rows_close(ds.embedding.values, fair_esm_embeddings(tiny_model, seqs, [2])[:, 0])
    np.testing.assert_array_equal(
        virnuc_dask.open_embeddings(store).embedding.values, ds.embedding.values
    )


def test_writes_nothing_outside_the_output_and_work_directories(tmp_path):
    """Temporary files, Dask's scratch space included, stay in the work directory."""
    temp, cwd, out_dir = tmp_path / "tmp", tmp_path / "cwd", tmp_path / "out"
    for folder in (temp, cwd, out_dir):
        folder.mkdir()
    result = subprocess.run(
        [*CLI, "embed", str(EXAMPLE), "-o", str(out_dir / "x.h5"), "--model", TINY,
         "--random-weights", "--workers", "1", "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=cwd,
        env={**os.environ, "TMPDIR": str(temp)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ["x.h5"]
    assert list(temp.iterdir()) == [] and list(cwd.iterdir()) == []


@pytest.mark.slow
def test_checkpoint_in_the_hub_cache_by_name(tmp_path, monkeypatch):
    """ESM-2 8M weights written in fair-esm's format into a private hub, loaded by name."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = load_model(resolve_weights("esm2_t6_8M_UR50D", random_weights=True, seed=21))
    write_fair_esm_checkpoint(model, hub_checkpoint("esm2_t6_8M_UR50D"))
    out = tmp_path / "out.h5"
    _embed(
        EXAMPLE,
        "-o",
        out,
        "--model",
        "esm2_t6_8M_UR50D",
        "--layers",
        "5,6",
        "--workers",
        "1",
    )
    ds = virnuc_dask.open_embeddings(out).load()
    _, seqs = _example()
    assert ds.attrs["random_weights"] == "no" and "sha256" in ds.attrs["weights"]
    assert_rows_close(ds.embedding.values, fair_esm_embeddings(model, seqs, [5, 6]))


@pytest.fixture
def scheduler_and_two_workers(tmp_path):
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1."""
    with dask_processes(tmp_path, 2) as (scheduler_file, address, _):
        yield scheduler_file, address


def test_dask_scheduler_and_workers(scheduler_and_two_workers, tmp_path, tiny_model):
    scheduler_file, address = scheduler_and_two_workers
    ids, seqs = _example()
    expected = fair_esm_embeddings(tiny_model, seqs, [2])[:, 0]
    by_file, by_address = tmp_path / "a.h5", tmp_path / "b.h5"
    _embed(
        EXAMPLE,
        "-o",
        by_file,
        "--scheduler-file",
        scheduler_file,
        "--model",
        TINY,
        "--random-weights",
        "--chunk-tokens",
        "1000",
    )
    _embed(
        EXAMPLE,
        "-o",
        by_address,
        "--scheduler",
        address,
        "--model",
        TINY,
        "--random-weights",
        "--chunk-tokens",
        "1000",
    )
    for path in (by_file, by_address):
        ds = virnuc_dask.open_embeddings(path).load()
        assert list(ds.sequence.values) == ids
        assert_rows_close(ds.embedding.values, expected)


def test_unreachable_scheduler_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [
            *CLI,
            "embed",
            str(EXAMPLE),
            "-o",
            str(tmp_path / "o.h5"),
            "--model",
            TINY,
            "--random-weights",
            "--scheduler",
            "tcp://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("virnuc-dask: error: cannot reach the Dask scheduler")
    assert not (tmp_path / "o.h5").exists()


def test_bad_per_residue_and_long_settings_exit_2(tmp_path):
    for flags, message in (
        (["--residue-dtype", "float32"], "--residue-dtype float32 applies to per-residue"),
        (["--long", "slide"], "Invalid value for '--long'"),
    ):
        result = subprocess.run(
            [*CLI, "embed", str(EXAMPLE), "-o", str(tmp_path / "x.h5"), "--model", TINY,
             "--random-weights", *flags],
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert not (tmp_path / "x.h5").exists()


def test_nucleotide_letters_are_refused_and_as_protein_embeds_them(tmp_path):
    """Issue 20 through the command: scaffolds of N runs are refused (exit 2, one line naming
    the file and both ways on); with --as-protein the same file is embedded as proteins."""
    scaffold = "N" * 170 + "ACGTTGCAAGGCTTAACGATCGATTACAGG"
    path, out = tmp_path / "scaffolds.fa", tmp_path / "scaffolds.h5"
    path.write_text(f">s1\n{scaffold * 3}\n>s2\n{scaffold[::-1] * 2}\n")
    flags = ["--model", TINY, "--random-weights", "--workers", "1", "--quiet"]
    refused = subprocess.run(
        [*CLI, "embed", str(path), "-o", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr == (
        f"virnuc-dask: error: {path} holds nucleotide sequences, not proteins (100% of its "
        "letters other than N and X are A, C, G, T, U or IUPAC codes); to embed the peptides "
        "of its reads, use --translate six-frame, or --as-protein for proteins made only of "
        "these letters\n"
    )
    assert not out.exists() and not os.path.exists(f"{out}.work")
    _embed(path, "-o", out, *flags, "--as-protein")
    ds = virnuc_dask.open_embeddings(out).load()
    assert list(ds.sequence.values) == ["s1", "s2"]
    assert ds.length.values.tolist() == [len(scaffold) * 3, len(scaffold) * 2]


def test_default_and_quiet_output_hold_no_dask_messages_and_verbose_has_them(tmp_path):
    """Default: the dashboard link, the progress line and the summary; Dask's INFO only with
    --verbose (distributed's loggers have handlers and levels of their own)."""
    fasta = tmp_path / "in.fasta"
    write_fasta(fasta, random_sequences(12, 20, 60, seed=5))

    def stderr(*flags: str) -> list[str]:
        out = f"out{len(list(tmp_path.glob('*.h5')))}.h5"
        result = subprocess.run(
            [*CLI, "embed", "in.fasta", "-o", out, "--model", TINY, "--random-weights",
             "--workers", "1", *flags],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr.splitlines()

    default = stderr()
    assert default[0].startswith("Dask dashboard: http://127.0.0.1:")
    assert all(" tokens (" in line for line in default[1:-1]), default
    assert default[-1].startswith("12 sequences, ") and default[-1].endswith(" tokens/s")
    # The input given as a relative path is recorded where it is, not as typed.
    assert virnuc_dask.open_embeddings(tmp_path / "out0.h5").attrs["inputs"] == f'["{fasta}"]'
    quiet = stderr("--quiet")
    assert len(quiet) == 1 and quiet[0].startswith("12 sequences, "), quiet
    verbose = stderr("--verbose")
    assert any("distributed.scheduler" in line for line in verbose)
    assert any("distributed.nanny" in line for line in verbose)
