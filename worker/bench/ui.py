"""What people see: a progress bar per step on stderr, and the results as tables."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

DISTURBED_PCT_OF_A_CORE = 20


class Ui:
    """Progress on stderr (stdout stays clean for --json)."""

    def __init__(self, enabled: bool) -> None:
        """Show progress bars only when `enabled`."""
        self.console = Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), console=self.console,
            disable=not enabled)
        self.enabled = enabled

    def __enter__(self) -> Ui:
        """Start drawing."""
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop drawing."""
        self.progress.stop()

    @contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """A progress line; yields `report(done)`."""
        task = self.progress.add_task(description, total=total)

        def report(done: int) -> None:
            self.progress.update(task, completed=done)

        try:
            yield report
            if total is not None:
                self.progress.update(task, completed=total)
        finally:
            self.progress.stop_task(task)

    def note(self, text: str) -> None:
        """A line of information above the bars."""
        if self.enabled:
            self.console.print(text, highlight=False)


def _num(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}{suffix}"
    return str(value)


def tables(result: dict[str, Any]) -> list[Table]:
    """The results for people."""
    throughput = Table(title="Throughput: commands/s, steady state (5% to 95% committed)")
    cpu_table = Table(title="CPU per command, ms: this worker's processes, PostgreSQL, Redis; "
                            "the baseline's processes")
    for table in (throughput, cpu_table):
        table.add_column("mix", no_wrap=True)
    for column in ("baseline", "this worker", "ratio"):
        throughput.add_column(column, justify="right")
    for column in ("worker", "PostgreSQL", "Redis", "baseline"):
        cpu_table.add_column(column, justify="right")
    for mix, run in result["worker"].items():
        base = result["baseline"].get(mix) or {}
        cpu = run.get("cpu_ms_per_cmd", {})
        throughput.add_row(mix, _num(base.get("cmds_per_s")), _num(run.get("cmds_per_s")),
                           _num(result["ratios"]["vs_baseline"].get(mix), 1, "x"))
        cpu_table.add_row(mix, _num(cpu.get("worker"), 3), _num(cpu.get("postgres"), 3),
                          _num(cpu.get("redis"), 3),
                          _num((base.get("cpu_ms_per_cmd") or {}).get("worker"), 3))
    disturbed = [
        f"{side} {mix}: {run['machine']['unexplained_pct_of_a_core']:.0f}%"
        for side in ("baseline", "worker") for mix, run in result[side].items()
        if ((run.get("machine") or {}).get("unexplained_pct_of_a_core") or 0)
        > DISTURBED_PCT_OF_A_CORE]
    if disturbed:
        throughput.caption = ("[yellow]CPU used by processes outside the benchmark (% of a "
                              "core): " + ", ".join(disturbed) + "[/]")
    ceilings = Table(title="Ceilings on this machine")
    ceilings.add_column("what")
    ceilings.add_column("per second", justify="right")
    ceilings.add_column("this worker's share", justify="right")
    postgres = result["ceilings"].get("postgres") or {}
    hashing = result["ceilings"].get("hash") or {}
    ratios = result["ratios"]
    ceilings.add_row(f"PostgreSQL single-row insert tx ({postgres.get('client', '-')})",
                     _num(postgres.get("single_row_tx_per_s")),
                     _num(ratios.get("posts_create_vs_pg_single_row_tx"), 2, "x"))
    ceilings.add_row("PostgreSQL rows in 100-row inserts",
                     _num(postgres.get("multi_row_rows_per_s")),
                     _num(ratios.get("posts_create_vs_pg_multi_row_rows"), 2, "x"))
    if hashing:
        ceilings.add_row(
            f"argon2id hashes (t={hashing['time_cost']}, m={hashing['memory_kib']} KiB, "
            f"p={hashing['parallelism']}), {hashing['per_core_per_s']:.1f}/core with "
            f"{hashing['processes']} hashing at once", _num(hashing.get("ceiling_per_s"), 1),
            _num(result.get("users_create_ratio_vs_hash_ceiling"), 2, "x"))
    if "alone_per_s" in hashing:
        ceilings.add_row(
            f"argon2id hashes, one core alone ({hashing['alone_per_s']:.1f}/s) x "
            f"{hashing['processes']}", _num(hashing.get("alone_x_processes_per_s"), 1),
            _num(ratios.get("users_create_vs_one_core_alone_x_processes"), 2, "x"))
    latency = result.get("latency") or {}
    soak = result.get("soak") or {}
    other = Table(title="Latency and memory")
    other.add_column("what")
    other.add_column("value", justify="right")
    until = latency.get("until", "commit")
    other.add_row(f"publish to {until} at {_num(latency.get('offered_per_s'))}/s "
                  "(half the posts.create peak)",
                  f"p50 {_num(latency.get('p50_ms'), 1)} ms, p99 {_num(latency.get('p99_ms'), 1)}"
                  f" ms, max {_num(latency.get('max_ms'), 1)} ms")
    machine = latency.get("machine") or {}
    if machine.get("busy_pct") is not None:
        other.add_row("  the machine meanwhile",
                      f"{_num(machine.get('busy_pct'), 0)}% of all cores busy; the "
                      f"publisher {_num(machine.get('publisher_pct_of_a_core'), 1)}% of a core")
    if latency.get("longest_commit_gap_ms") is not None:
        other.add_row("  the longest time in which nothing committed",
                      f"{_num(latency.get('longest_commit_gap_ms'), 1)} ms")
    flushes = latency.get("wal_flushes")
    if flushes:
        other.add_row("  PostgreSQL flushing its WAL (fsync)",
                      f"{_num(flushes.get('flushes'))} flushes, {_num(flushes.get('flush_ms'))} "
                      f"ms in all, {_num(flushes.get('most_in_one_second_ms'))} ms at most in "
                      "one second")
    rss = (soak.get("run") or {}).get("rss_mb") or {}
    other.add_row(f"worker RSS over the soak ({_num(soak.get('commands'))} commands, MB)",
                  f"{_num(rss.get('start_total'), 1)} -> {_num(rss.get('end_total'), 1)} "
                  f"(per process: {rss.get('end_per_process', '-')})")
    other.add_row("RSS growth after warm-up (largest per process)",
                  _num(result.get("rss_growth_pct"), 1, " %"))
    targets = Table(title="Targets")
    for column in ("target", "value", "met"):
        targets.add_column(column)
    for name, target in result["targets"].items():
        met = target.get("met")
        targets.add_row(name, _num(target.get("value"), 2),
                        "-" if met is None else "[green]yes[/]" if met else "[red]no[/]")
    return [throughput, cpu_table, ceilings, other, targets]
