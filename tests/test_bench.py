"""The benchmark package: a quick run on the session's servers reports every figure; its rates."""

from __future__ import annotations

import json
import math

import pytest

from worker.bench import main, plan
from worker.bench.measure import rate_from_samples, rate_from_times
from worker.bench.workload import allocate

HEADLINE_KEYS = ("baseline_cmds_per_s", "worker_cmds_per_s", "ratio_vs_baseline",
                 "users_create_ratio_vs_hash_ceiling", "p99_ms_at_half_peak")


def positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_quick_benchmark_reports_every_figure_as_a_sane_number(
        servers: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    server_url, broker_url = servers
    code = main(["--quick", "--json", "--no-progress", "--database-url", server_url,
                 "--broker-url", broker_url])
    result = json.loads(capsys.readouterr().out)

    assert code == 0, result["errors"]
    assert result["errors"] == []
    for key in HEADLINE_KEYS:
        assert positive(result[key]), (key, result[key])
    assert isinstance(result["rss_growth_pct"], int | float)
    assert -50 < result["rss_growth_pct"] < 100
    assert result["p50_ms_at_half_peak"] <= result["p99_ms_at_half_peak"]
    assert set(result["worker"]) == set(plan.MIXES) == set(result["baseline"])
    for side in ("worker", "baseline"):
        for mix, run in result[side].items():
            assert positive(run["cmds_per_s"]), (side, mix, run)
            assert run["rejected"] == 0
            assert run["cpu_ms_per_cmd"]["worker"] is not None
            assert positive(run["rss_mb"]["end_total"])
    postgres, hashing = result["ceilings"]["postgres"], result["ceilings"]["hash"]
    assert positive(postgres["single_row_tx_per_s"]) and positive(postgres["multi_row_rows_per_s"])
    assert positive(hashing["per_core_per_s"])
    assert hashing["ceiling_per_s"] == pytest.approx(
        hashing["per_core_per_s"] * hashing["processes"], rel=0.01)
    assert result["latency"]["missing"] == 0
    # Each mix through the baseline right before this worker, mix after mix.
    starts = [result[side][mix]["started_at"] for mix in plan.MIXES
              for side in ("baseline", "worker")]
    assert starts == sorted(starts)
    assert set(result["targets"]) and all("met" in target for target in result["targets"].values())


def test_a_mix_is_split_exactly_by_its_shares() -> None:
    counts = allocate(plan.MIXES["mixed"], 1001)

    assert sum(counts.values()) == 1001
    assert counts["posts.create"] in (400, 401)
    assert counts["posts.delete"] == 100


def test_steady_rate_counts_only_commits_after_the_window_opens() -> None:
    # 1,000 commands a second, committed one at a time.
    times = [1000 + i / 1000 for i in range(1, 1001)]

    rate = rate_from_times(times, started_at=1000)

    assert rate is not None
    assert rate.per_second == pytest.approx(1000, rel=0.01)
    assert rate.window_s == pytest.approx(0.9, rel=0.01)
    assert "5% to 95%" in rate.how


def test_lumpy_commits_fall_back_to_the_whole_run() -> None:
    # Two batches of 100, committed 2 s and 4 s after the start: 50 commands a second.
    times = [1002.0] * 100 + [1004.0] * 100

    rate = rate_from_times(times, started_at=1000)

    assert rate is not None
    assert rate.per_second == pytest.approx(50)
    assert "whole run" in rate.how


def test_polled_counts_are_interpolated_between_samples() -> None:
    samples = [(0.0, 0), (1.0, 100), (2.0, 200), (10.0, 1000)]

    rate = rate_from_samples(samples, 1000)

    assert rate is not None
    assert rate.per_second == pytest.approx(100)
    assert rate.window_s == pytest.approx(9.0)


@pytest.mark.integration
def test_the_lean_publisher_sends_one_lpush_a_message_and_checks_every_reply(
        broker_url: str) -> None:
    import uuid

    import redis

    from worker.bench.measure import LeanPublisher

    client = redis.Redis.from_url(broker_url)
    queue = f"lean-{uuid.uuid4().hex}"
    messages = [f"message {i}".encode() for i in range(7)]
    publisher = LeanPublisher(client, queue, messages)
    try:
        publisher.send(0, 1)
        publisher.send(1, 7)
        publisher.confirm()
    finally:
        publisher.close()
    # LPUSH puts each in front: the first sent is the first a consumer's BRPOP takes.
    assert client.lrange(queue, 0, -1) == messages[::-1]
    client.delete(queue)

    client.set(queue, "not a list")
    publisher = LeanPublisher(client, queue, messages[:2])
    try:
        publisher.send(0, 2)
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            publisher.confirm()
    finally:
        publisher.close()
        client.delete(queue)


def test_the_longest_commit_gap_counts_from_the_first_publish() -> None:
    from worker.bench.measure import commit_gap

    published = [10.0, 10.001, 10.002]
    assert commit_gap(published, [10.004, 10.006, 10.106, 10.110]) == pytest.approx(100.0)
    # Nothing committed for the first 50 ms: that is a gap too.
    assert commit_gap(published, [10.050, 10.051]) == pytest.approx(50.0)
    assert commit_gap(published, []) is None


@pytest.mark.integration
def test_wal_flushes_count_what_commits_waited_for_the_disk(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import uuid

    from worker.bench.measure import WalFlushes
    from worker.bench.stack import connect

    # Timing on for this test's sessions only (a superuser setting; the benchmark's own
    # throwaway server has it on for everyone).
    monkeypatch.setenv("PGOPTIONS", "-c track_wal_io_timing=on")
    writer = connect(database_url)
    with writer.cursor() as cursor:
        cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if not cursor.fetchone()[0]:
            writer.close()
            pytest.skip("track_wal_io_timing needs a superuser")
    flushes = WalFlushes(database_url, interval=0.05)
    flushes.start()
    table = f"wal_probe_{uuid.uuid4().hex}"
    with writer.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {table} (n int)")  # logged: a temporary one is not
        writer.commit()
        for n in range(5):
            cursor.execute(f"INSERT INTO {table} VALUES (%s)", (n,))
            writer.commit()
        cursor.execute(f"DROP TABLE {table}")
        # The backend reports its statistics before it answers the next commit.
        cursor.execute("SELECT pg_stat_force_next_flush()")
        writer.commit()
    writer.close()
    seen = flushes.stop()

    assert seen is not None
    assert seen["flushes"] >= 5
    assert seen["flush_ms"] > 0
    assert 0 < seen["most_in_one_second_ms"] <= seen["flush_ms"]
    assert flushes.stop() == seen  # stopping again (a phase's clean-up) changes nothing
