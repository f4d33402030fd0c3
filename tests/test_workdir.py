"""The work directory: marked as the tool's own, reused only by a run of the same fingerprint."""

from __future__ import annotations

import pytest

from tests.helpers import TINY, random_sequences, write_fasta
from virnuc_dask.errors import VirnucError
from virnuc_dask.run import workdir
from virnuc_dask.storage import ownership


def test_a_work_directory_is_created_marked_and_removed(tmp_path):
    work = tmp_path / "w"
    assert workdir.open_work_dir(work, resume=False) is None
    assert ownership.marker(work)["kind"] == workdir.KIND
    (work / "shards").mkdir()
    assert workdir.remove_if_unused(work)
    assert not work.exists()


def test_a_work_directory_with_shards_is_kept_after_a_failure(tmp_path):
    work = tmp_path / "w"
    workdir.open_work_dir(work, resume=False)
    (work / "shards").mkdir()
    (work / "shards" / "shard-000000.h5").write_bytes(b"x")
    assert not workdir.remove_if_unused(work)
    assert work.exists()


def test_an_unmarked_folder_is_never_removed(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "data.txt").write_text("keep")
    with pytest.raises(VirnucError, match="nothing in it was touched"):
        workdir.remove(folder)
    with pytest.raises(VirnucError, match="nothing in it was touched"):
        workdir.open_work_dir(folder, resume=True)
    assert (folder / "data.txt").read_text() == "keep"


def _interrupted_run(tmp_path, finished: int = 2, **settings):
    """A work directory as a run interrupted after ``finished`` chunks leaves it."""
    import numpy as np

    import virnuc_dask
    from virnuc_dask.output import write_shard

    fasta = tmp_path / "in.fasta"
    write_fasta(fasta, random_sequences(60, 30, 80, seed=2))
    job = virnuc_dask.prepare(
        [fasta], tmp_path / "out.h5", lanes=1, model=TINY, random_weights=True,
        chunk_tokens=1000, **settings,
    )  # fmt: skip
    for chunk in job.partition.chunks[:finished]:
        rows = job.partition.order[chunk.start : chunk.stop]
        write_shard(
            job.work_dir / "shards" / f"shard-{chunk.number:06d}.h5",
            rows=rows,
            ids=job.index.ids(rows),
            embedding=np.ones((len(rows), 1, 8), dtype=np.float32),
            fingerprint=job.fingerprint,
        )
    job.release()
    return fasta, job.work_dir


def _prepare(fasta, tmp_path, **settings):
    import virnuc_dask

    return virnuc_dask.prepare(
        [fasta], tmp_path / "out.h5", lanes=1, model=TINY, random_weights=True,
        chunk_tokens=1000, **settings,
    )  # fmt: skip


def test_resume_with_a_changed_setting_is_refused_and_keeps_the_finished_chunks(tmp_path):
    fasta, work = _interrupted_run(tmp_path)
    shards = sorted((work / "shards").glob("shard-*.h5"))
    assert len(shards) == 2
    with pytest.raises(VirnucError) as refused:
        _prepare(fasta, tmp_path, seed=1, resume=True)
    message = str(refused.value)
    assert "2 finished chunks" in message
    assert "seed=0 then, seed=1 now" in message  # the setting that differs, old and new
    assert "restart=True" in message  # the explicit way to discard them
    assert "layers" not in message and "model=" not in message  # only what differs
    assert sorted((work / "shards").glob("shard-*.h5")) == shards
    # Refused, the earlier run's work directory is as it was: resumable with its settings.
    job = _prepare(fasta, tmp_path, resume=True)
    assert sorted(s.chunk for s in job.reused) == [0, 1]
    job.release()


def test_restart_discards_the_finished_chunks_of_other_settings(tmp_path):
    fasta, work = _interrupted_run(tmp_path)
    job = _prepare(fasta, tmp_path, seed=1, restart=True)
    assert job.reused == [] and not list((work / "shards").glob("shard-*.h5"))
    job.release()
    with pytest.raises(VirnucError, match="resume=True and restart=True exclude each other"):
        _prepare(fasta, tmp_path, resume=True, restart=True)


def test_a_work_directory_of_other_settings_without_finished_chunks_is_reused(tmp_path):
    fasta, work = _interrupted_run(tmp_path, finished=0)
    job = _prepare(fasta, tmp_path, seed=1, resume=True)  # nothing to lose: no refusal
    assert job.reused == []
    job.release()
