"""Progress: workers report each batch through Dask's event log; the driver shows tokens."""

from __future__ import annotations

import io

import virnuc_dask
from tests.faults import SlowBatches
from tests.helpers import TINY, random_sequences, write_fasta
from virnuc_dask.cluster.events import TOPIC, BatchReporter, listen, stop_listening
from virnuc_dask.run.progress import TextProgress


def test_batches_are_reported_within_a_chunk(cluster_client, tmp_path):
    fasta = tmp_path / "in.fasta"
    write_fasta(fasta, random_sequences(80, 30, 60, seed=3))
    job = virnuc_dask.prepare(
        [fasta],
        tmp_path / "out.h5",
        client=cluster_client,
        model=TINY,
        random_weights=True,
        chunk_tokens=10**6,
        tokens_per_batch=256,
    )
    tokens = {c.number: c.tokens for c in job.partition.chunks}
    messages, other_run = [], []
    listen(cluster_client, job.token, messages.append)
    listen(cluster_client, "another-run", other_run.append)
    cluster_client.register_plugin(SlowBatches(0.3))
    try:
        job.run(cluster_client, progress=False)
    finally:
        stop_listening(cluster_client, job.token)
        stop_listening(cluster_client, "another-run")
        cluster_client.unregister_worker_plugin(SlowBatches.name)
    assert other_run == []
    # One chunk per worker, each of about a dozen batches of 0.3 s: several messages per
    # chunk while it computed, growing, all short of the chunk's tokens.
    for number, total in tokens.items():
        counts = [m["tokens"] for m in messages if m["chunk"] == number]
        assert len(counts) >= 3, (number, counts)
        assert counts == sorted(counts) and counts[0] < counts[-1] <= total, (counts, total)
    assert {m["chunk"] for m in messages} == set(tokens)
    assert TOPIC in cluster_client.get_events()  # the scheduler's own event log carried them


def test_a_reporter_throttles_and_counts_every_token():
    sent = []
    reporter = BatchReporter(lambda topic, msg: sent.append((topic, msg)), "run-1", 7)
    reporter.last = 0.0  # long ago: the first batch is sent
    reporter(100)
    reporter(50)  # within the interval: counted, not sent
    assert sent == [(TOPIC, {"run": "run-1", "chunk": 7, "tokens": 100})]
    reporter.last = 0.0
    reporter(25)
    assert sent[-1][1]["tokens"] == 175


def test_text_progress_shows_tokens_rate_and_time_left_in_a_log():
    out = io.StringIO()
    bar = TextProgress(4, 1000, stream=out, every=3600, dashboard="http://127.0.0.1:8787/status")
    bar.update(0, 0)
    bar.update(1, 250)  # within the interval: a log gets no line
    bar.update(4, 1000, final=True)
    lines = out.getvalue().splitlines()
    assert lines[0] == "Dask dashboard: http://127.0.0.1:8787/status"
    assert lines[1].startswith("0/1,000 tokens (0%), 0/4 chunks")
    assert lines[2].startswith("1,000/1,000 tokens (100%), 4/4 chunks") and "tokens/s" in lines[2]
    assert len(lines) == 3


def test_the_first_line_is_shown_on_a_machine_booted_a_minute_ago(monkeypatch):
    # time.monotonic() counts from boot on Linux: a freshly booted machine reads small values.
    import virnuc_dask.run.progress as progress

    monkeypatch.setattr(progress.time, "monotonic", lambda: 60.0)
    out = io.StringIO()
    bar = TextProgress(2, 100, stream=out, every=3600)
    bar.update(0, 0)
    assert out.getvalue().startswith("0/100 tokens (0%), 0/2 chunks")


def test_progress_never_shows_more_than_the_total():
    out = io.StringIO()
    bar = TextProgress(2, 1000, stream=out, every=0)
    bar.update(1, 1200)  # windows overlap: batches may report more tokens than the chunk's
    assert out.getvalue().startswith("1,000/1,000 tokens (100%), 1/2 chunks")


def test_the_bar_and_the_summary_state_one_rate():
    from virnuc_dask.output import ShardInfo
    from virnuc_dask.run.report import RunReport

    # Half of the tokens come from reused chunks of an earlier run: neither line counts them.
    shards = [
        ShardInfo(0, "a.h5", 10, 500, "resumed", 0.0),
        ShardInfo(1, "b.h5", 10, 500, "tcp://127.0.0.1:1", 4.0),
    ]
    report = RunReport.from_shards("out.h5", shards, 10.0)
    assert report.summary().endswith("10.0 s, 50 tokens/s")
    out = io.StringIO()
    bar = TextProgress(2, 1000, stream=out, every=0)
    bar.update(1, 500)  # the reused chunk, counted before anything computed
    bar.update(2, 1000, final=True, seconds=10.0)
    assert ", 50 tokens/s" in out.getvalue().splitlines()[-1]


def test_finished_chunks_stay_counted_on_the_dashboard_until_the_run_ends(cluster_client, tmp_path):
    """The dashboard's Progress panel counts a run's tasks the scheduler still knows: a chunk
    released as soon as it finished would vanish from it ("embed-chunk 0/8")."""
    import threading
    import time

    from tests.faults import SlowChunks

    fasta = tmp_path / "in.fasta"
    write_fasta(fasta, random_sequences(120, 30, 60, seed=4))
    job = virnuc_dask.prepare(
        [fasta], tmp_path / "out.h5", client=cluster_client, model=TINY, random_weights=True,
        chunk_tokens=800,
    )  # fmt: skip
    chunks = len(job.partition.chunks)
    assert chunks >= 6

    def finished_on_scheduler(dask_scheduler) -> int:
        return sum(
            ts.state == "memory"
            for key, ts in dask_scheduler.tasks.items()
            if str(key).startswith("embed-chunk-")
        )

    cluster_client.register_plugin(SlowChunks(0.3))
    runner = threading.Thread(target=job.run, args=(cluster_client,), kwargs={"progress": False})
    try:
        runner.start()
        seen = 0
        while runner.is_alive():
            seen = max(seen, cluster_client.run_on_scheduler(finished_on_scheduler))
            time.sleep(0.05)
    finally:
        runner.join()
        cluster_client.unregister_worker_plugin(SlowChunks.name)
    # Every chunk but those the two workers finish last, as the run ends (old code: 1).
    assert seen >= chunks - 2, (seen, chunks)
    # Released when the run ends (a release reaches the scheduler a moment later).
    deadline = time.monotonic() + 5
    while cluster_client.run_on_scheduler(finished_on_scheduler) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster_client.run_on_scheduler(finished_on_scheduler) == 0
