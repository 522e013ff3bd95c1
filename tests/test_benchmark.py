"""The benchmark runs end to end and reports every figure the performance issue asks for."""

from __future__ import annotations

import json

import pytest

from worker import benchmark

pytestmark = pytest.mark.integration

KEYS = ("baseline_cmds_per_s", "worker_cmds_per_s", "ratio_vs_baseline",
        "users_create_ratio_vs_hash_ceiling", "p99_ms_at_half_peak", "rss_growth_pct")


def test_a_quick_benchmark_prints_one_json_object_with_every_figure(
    servers: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert benchmark.main(["--quick", "--json", "--database-url", servers[0],
                           "--broker-url", servers[1]]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in KEYS:
        assert isinstance(report[key], int | float), key
    assert report["baseline_cmds_per_s"] > 0 and report["worker_cmds_per_s"] > 0
    assert report["ratio_vs_baseline"] == pytest.approx(
        report["worker_cmds_per_s"] / report["baseline_cmds_per_s"], rel=0.01)
    for mix in ("posts.create", "tags.create", "users.update", "posts.delete", "mixed",
                "users.create"):
        run = report["worker"][mix]
        assert run["per_second"] > 0 and run["dead_letters"] == 0, (mix, run)
        assert run["cpu_ms"]["worker"] > 0
    assert report["ceiling"]["pg_single_row_tx_per_s"] > 0
    assert report["ceiling"]["hash_ceiling_per_s"] > 0
    assert report["latency"]["commands"] > 0
