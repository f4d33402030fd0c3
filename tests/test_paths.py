"""The run's paths: every dangerous relation between output, Zarr, work directory, inputs."""

from __future__ import annotations

import pytest

from virnuc_dask.errors import VirnucError, command_line_spelling
from virnuc_dask.storage.paths import run_paths


@pytest.fixture
def fasta(tmp_path):
    path = tmp_path / "in.fa"
    path.write_text(">a\nMK\n")
    return path


def test_defaults_and_absolute_paths(tmp_path, fasta, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = run_paths("out.h5", "out.zarr", None, [str(fasta)])
    assert paths.output == tmp_path / "out.h5"
    assert paths.zarr == tmp_path / "out.zarr"
    assert paths.work_dir == tmp_path / "out.h5.work"


@pytest.mark.parametrize(
    "output, zarr, work",
    [
        ("o.h5", "o.h5", None),
        ("o.h5", "o.h5.work", None),
        ("o.h5", "o.h5.work/z", None),
        ("o.h5", "z", "z/w"),
        ("d/o.h5", None, "d"),
        ("o.h5", None, "o.h5"),
    ],
)
def test_overlapping_places_are_refused(tmp_path, fasta, output, zarr, work):
    (tmp_path / "d").mkdir()
    (tmp_path / "z").mkdir()
    with pytest.raises(VirnucError, match="overlap"):
        run_paths(
            tmp_path / output,
            tmp_path / zarr if zarr else None,
            tmp_path / work if work else None,
            [str(fasta)],
        )


def test_an_input_as_output_or_inside_the_work_directory_is_refused(tmp_path, fasta):
    with pytest.raises(VirnucError, match="input .* is the output"):
        run_paths(fasta, None, None, [str(fasta)])
    (tmp_path / "w").mkdir()
    inner = tmp_path / "w" / "in.fa"
    inner.write_text(">a\nMK\n")
    with pytest.raises(VirnucError, match="is inside the work_dir"):
        run_paths(tmp_path / "o.h5", None, tmp_path / "w", [str(inner)])


def test_a_hard_link_to_an_input_is_the_same_file(tmp_path, fasta):
    (tmp_path / "alias.h5").hardlink_to(fasta)
    with pytest.raises(VirnucError, match="destroy"):
        run_paths(tmp_path / "alias.h5", None, None, [str(fasta)])


def test_symbolic_links_are_refused_as_targets(tmp_path, fasta):
    (tmp_path / "link.zarr").symlink_to(tmp_path)
    with pytest.raises(VirnucError, match="symbolic link"):
        run_paths(tmp_path / "o.h5", tmp_path / "link.zarr", None, [str(fasta)])


def test_missing_folders_are_named_in_the_callers_spelling(tmp_path, fasta):
    with pytest.raises(VirnucError, match="^work_dir folder .* does not exist"):
        run_paths(tmp_path / "o.h5", None, tmp_path / "no" / "w", [str(fasta)])
    with command_line_spelling(), pytest.raises(VirnucError, match="^--zarr folder"):
        run_paths(tmp_path / "o.h5", tmp_path / "no" / "z", None, [str(fasta)])
