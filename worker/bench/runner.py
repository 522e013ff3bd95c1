"""The benchmark's phases in order, on one set of servers, and its command line."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil  # type: ignore[import-untyped]
import redis

from worker.bench import ceilings, plan
from worker.bench.measure import (
    Drain,
    LedgerProgress,
    Monitor,
    RunResult,
    TableProgress,
    WalFlushes,
    drain,
    paced,
    rss_growth_pct,
)
from worker.bench.processes import Consumer, Meters, PhaseError, consumer, wait_for
from worker.bench.stack import Stack, connect, open_stack
from worker.bench.ui import Ui, tables
from worker.bench.workload import Batch, Seeded, build, forget_results, posts_needed, seed
from worker.protocol import encode

AUTHORS = 1_000
RSS_FLAT_PCT = 10.0
SPEEDUP_TARGET = 20.0
MIXED_SPEEDUP_TARGET = 18.0
HASH_SHARE_TARGET = 0.9
P99_TARGET_MS = 25.0
BUSY_WARNING_PCT = 15.0
CODES = {"posts.create": "pc", "tags.create": "tc", "users.update": "uu", "posts.delete": "pd",
         "mixed": "mx", "users.create": "uc"}
SERVER_ENV = ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND", "COMMANDS_QUEUE")


@dataclass
class Options:
    """The command line (`worker.bench.bench`), parsed."""

    json: bool
    quick: bool
    sizes: plan.Sizes
    concurrency: int
    worker_command: str
    database_url: str | None
    broker_url: str | None
    data_dir: Path | None
    log_dir: Path | None
    progress: bool
    skip_baseline: bool
    redis_aof: bool = False


@dataclass
class Side:
    """One consumer under test, with its database and what it was seeded with."""

    name: str
    code: str
    database_url: str
    queue: str
    seeded: Seeded
    monitor: Monitor
    runs: dict[str, RunResult] = field(default_factory=dict)


class Benchmark:
    """One run of every phase; a failed phase is recorded and the rest go on."""

    def __init__(self, options: Options, stack: Stack, ui: Ui, log_dir: Path) -> None:
        """Prepare a run on `stack`."""
        self.options = options
        self.sizes = options.sizes
        self.stack = stack
        self.ui = ui
        self.log_dir = log_dir
        self.broker = redis.Redis.from_url(stack.broker_url, socket_timeout=60)
        self.rng = random.Random(20261124)  # noqa: S311 - reproducible data, not security
        self.errors: list[dict[str, str]] = []
        self.ceilings: dict[str, Any] = {}
        self.latency: dict[str, Any] = {}
        self.soak: dict[str, Any] = {}
        self.idle_check: dict[str, float] = {}
        self.users_create_count = max(20, self.sizes.baseline_commands // 4)
        self.exits = ExitStack()

    # --- plumbing -----------------------------------------------------------------------

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run a phase; an error is recorded (and shown) instead of ending the benchmark."""
        try:
            yield
        except PhaseError as error:
            self._failed(name, str(error))
        except Exception as error:
            self._failed(name, f"{type(error).__name__}: {error}\n{traceback.format_exc()}")

    def _failed(self, name: str, message: str) -> None:
        self.errors.append({"phase": name, "error": message})
        self.ui.console.print(f"[red]{name} failed:[/] {message.splitlines()[0]}",
                              highlight=False)

    def env(self, database_url: str, **extra: str) -> dict[str, str]:
        """The environment of a consumer: ours, pointed at the benchmark's servers."""
        environment = {key: value for key, value in os.environ.items() if key not in SERVER_ENV}
        environment.update(DATABASE_URL=database_url, BROKER_URL=self.stack.broker_url,
                           PYTHONUNBUFFERED="1", **extra)
        return environment

    def prefix(self, side: Side, mix: str) -> str:
        """A fresh command-id prefix for one run."""
        return f"{side.code}-{CODES.get(mix, mix)}-{uuid.uuid4().hex[:6]}"

    def count_for(self, code: str, mix: str) -> int:
        """How many commands a run of `mix` sends to the consumer with `code` (b or w)."""
        if mix == plan.HASHING_MIX:
            return self.users_create_count
        return self.sizes.baseline_commands if code == "b" else self.sizes.commands

    # --- phases -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Every phase; the results as one JSON-ready dict."""
        started = time.monotonic()
        self.idle_check = machine_idle_check()
        if self.idle_check["busy_pct"] > BUSY_WARNING_PCT:
            self.ui.console.print(
                f"[yellow]warning:[/] the machine is {self.idle_check['busy_pct']:.0f}% busy "
                "before the benchmark starts: other work will distort the figures",
                highlight=False)
        baseline = worker = None
        sides: list[tuple[Side, str]] = []
        with self.exits:
            with self.phase("ceilings"):
                self.measure_ceilings()
            if not self.options.skip_baseline:
                with self.phase("baseline"):
                    baseline = self.make_side("baseline", "b", plan.BASELINE_QUEUE, extra=0)
                    sides.append((baseline, plan.BASELINE_COMMAND))
            with self.phase("worker"):
                worker = self.make_side("worker", "w", plan.WORKER_QUEUE,
                                        extra=posts_needed(plan.MIXES[plan.SOAK_MIX],
                                                           self.sizes.soak))
                sides.append((worker, self.options.worker_command))
            self.measure_sides(sides)
        return self.result(baseline, worker, time.monotonic() - started)

    def measure_ceilings(self) -> None:
        """PostgreSQL inserts (scratch database) and password hashes."""
        seconds = self.sizes.ceiling_seconds
        # Hashes first: after pgbench, PostgreSQL's own background work would slow them.
        with self.ui.step("ceiling: argon2id hashes", total=None):
            self.ceilings["hash"] = ceilings.hash_ceiling(self.options.concurrency,
                                                          self.sizes.hash_seconds)
        with self.ui.step("ceiling: PostgreSQL inserts", total=None):
            url = self.stack.create_database("ceiling")
            self.ceilings["postgres"] = ceilings.postgres_ceiling(url, seconds)
        rate = self.ceilings["hash"]["ceiling_per_s"]
        self.users_create_count = max(20, min(self.sizes.commands,
                                              round(rate * self.sizes.users_create_seconds)))

    def hash_ceiling_around(self, side: Side, run: Callable[[], RunResult]) -> RunResult:
        """`run` (this worker's users.create) between two measures of the hash ceiling.

        A shared machine's speed drifts over minutes (here by 10% and more): the ceiling the
        run is held to is the mean of the one measured right before it and right after it.
        The ceiling measured at the start (which sized the run) is kept as `hash_at_start`.
        """
        def measure(label: str) -> dict[str, Any]:
            side.monitor.checkpoint()
            with self.ui.step(f"ceiling: argon2id hashes, {label}", total=None):
                return ceilings.hash_ceiling(self.options.concurrency, self.sizes.hash_seconds,
                                             alone=False)

        start = self.ceilings.get("hash") or {}
        self.ceilings["hash_at_start"] = start
        before = measure("before users.create")
        result = run()
        after = measure("after users.create")
        self.ceilings["hash_before"], self.ceilings["hash_after"] = before, after
        self.ceilings["hash"] = {
            **before, "measured": "mean of right before and right after the run",
            **{key: round((before[key] + after[key]) / 2, 2)
               for key in ("per_core_per_s", "ceiling_per_s")},
            # One core alone, from the start: informative, not what the run is held to.
            **{key: start[key] for key in ("alone_per_s", "alone_x_processes_per_s")
               if key in start}}
        return result

    def make_side(self, name: str, code: str, queue: str, extra: int) -> Side:
        """A consumer's database, migrated and seeded for every run it will get."""
        from worker.runner import migrate
        from worker.security import hash_password

        with self.ui.step(f"{name}: migrate and seed a fresh database", total=None):
            posts = extra + sum(posts_needed(mix, self.count_for(code, mix_name))
                                for mix_name, mix in plan.MIXES.items())
            url = self.stack.create_database(name)
            migrate(url)
            seeded = seed(url, AUTHORS, posts, hash_password("bench-password-1"))
            monitor = Monitor(url)
            self.exits.callback(monitor.close)
            return Side(name, code, url, queue, seeded, monitor)

    def start(self, side: Side, template: str) -> Consumer:
        """Start `side`'s consumer and wait until it applies a first command."""
        extra = ({"COMMANDS_QUEUE": side.queue} if side.code == "w"
                 else {"BASELINE_QUEUE": side.queue})
        process = consumer(side.name, template, concurrency=self.options.concurrency,
                           queue=side.queue, env=self.env(side.database_url, **extra),
                           log=self.log_dir / f"{side.name}.log")
        self.ui.note(f"{side.name}: {' '.join(process.argv)}")
        process.start()
        self.exits.callback(process.stop)
        self.broker.delete(side.queue)
        probe = f"probe-{uuid.uuid4().hex[:10]}"
        self.broker.lpush(side.queue, encode("tags.create", {"data": {"name": probe},
                                                              "command_id": probe},
                                             queue=side.queue, task_id=probe))
        if side.code == "w":
            sql = "SELECT count(*) FROM command_ledger WHERE command_id = %s"
        else:
            sql = "SELECT count(*) FROM tags WHERE name = %s"
        with self.ui.step(f"{side.name}: starting", total=None):
            wait_for(lambda: bool(side.monitor.value(sql, (probe,))), 90,
                     f"the {side.name} applying a first command", watched=process)
        self.broker.delete(f"celery-task-meta-{probe}")
        return process

    def meters(self, side: Side, process: Consumer) -> Meters:
        """What a run of `side` meters."""
        return Meters(process.pid, self.stack.postgres_pid, self.stack.redis_pid,
                      (side.monitor.backend_pid,))

    def measure_sides(self, sides: list[tuple[Side, str]]) -> None:
        """Every mix through each side's consumer, then latency and the soak through this
        worker's.

        Both consumers run side by side (the one not measured idles) and each mix goes
        through the baseline right before this worker: the machine's speed drifts over
        minutes, and a ratio is only as good as the two runs it divides were measured at the
        same speed. The baseline stops before the latency and the soak.
        """
        processes: dict[str, Consumer] = {}
        started: list[tuple[Side, str]] = []
        for side, template in sides:
            with self.phase(side.name):
                processes[side.name] = self.start(side, template)
                started.append((side, template))
        for mix_name, mix in plan.MIXES.items():
            for side, template in started:
                with self.phase(f"{side.name} {mix_name}"):
                    process = self.running(side, template, processes)
                    batch = build(self.prefix(side, mix_name), mix,
                                  self.count_for(side.code, mix_name), side.seeded, self.rng)
                    label = f"{side.name}: {mix_name}"
                    if side.code == "w" and mix_name == plan.HASHING_MIX:
                        side.runs[mix_name] = self.hash_ceiling_around(
                            side, functools.partial(self.drain, side, process, batch, label))
                    else:
                        side.runs[mix_name] = self.drain(side, process, batch, label)
        for side, _ in started:
            if side.code != "w":
                processes.pop(side.name).stop()
        for side, template in started:
            if side.code == "w":
                with self.phase("latency"):
                    self.measure_latency(side, self.running(side, template, processes))
                with self.phase("soak"):
                    self.measure_soak(side, self.running(side, template, processes))
        for process in processes.values():
            process.stop()

    def running(self, side: Side, template: str, processes: dict[str, Consumer]) -> Consumer:
        """`side`'s consumer, started again if it died in an earlier phase."""
        process = processes[side.name]
        if not process.alive():
            process = processes[side.name] = self.start(side, template)
        return process

    def drain(self, side: Side, process: Consumer, batch: Batch, label: str,
              rss_every: float | None = None) -> RunResult:
        """Time one batch through the consumer."""
        progress: LedgerProgress | TableProgress
        if side.code == "w":
            progress = LedgerProgress(side.monitor, batch.prefix)
            exact = progress.applied_times
        else:
            progress = TableProgress(side.monitor, batch)
            exact = None
        run = Drain(process, self.meters(side, process), self.broker, side.queue, batch,
                    progress, self.sizes.stall_seconds, side.monitor,
                    poll_seconds=0.5 if rss_every else (0.2 if exact else 0.1),
                    rss_every=rss_every)
        try:
            with self.ui.step(label, total=len(batch)) as report:
                result = drain(run, report, exact)
        except BaseException:
            self.broker.delete(side.queue)  # what is left would slow the next run down
            raise
        finally:
            forget_results(self.broker, batch)
        if result.rejected:
            raise PhaseError(f"{label}: {result.rejected} commands were rejected "
                             "(see the dead_letters table)")
        return result

    def measure_latency(self, side: Side, process: Consumer) -> None:
        """Publish posts.create at half the measured peak; publish-to-commit percentiles."""
        peak = side.runs[plan.HEADLINE_MIX].cmds_per_s if plan.HEADLINE_MIX in side.runs else None
        if not peak:
            raise PhaseError("no posts.create peak to take half of")
        rate = peak / 2
        count = max(20, round(rate * self.sizes.latency_seconds))
        batch = build(self.prefix(side, "lat"), plan.MIXES[plan.HEADLINE_MIX], count,
                      side.seeded, self.rng)
        try:
            with self.ui.step(f"latency: {rate:,.0f}/s for {self.sizes.latency_seconds:g} s",
                              total=count) as report:
                result = paced(process, self.meters(side, process), self.broker, side.queue,
                               batch, rate,
                               LedgerProgress(side.monitor, batch.prefix),
                               self.sizes.stall_seconds, report, WalFlushes(side.database_url))
        finally:
            forget_results(self.broker, batch)
        self.latency = result.as_dict()

    def measure_soak(self, side: Side, process: Consumer) -> None:
        """A long mixed run; resident memory per process from 10% done to the end."""
        mix = plan.MIXES[plan.SOAK_MIX]
        batch = build(self.prefix(side, "soak"), mix, self.sizes.soak, side.seeded, self.rng)
        result = self.drain(side, process, batch, f"soak: {plan.SOAK_MIX}", rss_every=0.1)
        growth: dict[str, Any] = {"from": "10% applied", "to": "end"}
        if result.rss_marks:
            growth.update(rss_growth_pct(result.rss_marks[0].rss, result.rss_end))
        self.soak = {"mix": plan.SOAK_MIX, "commands": self.sizes.soak, "growth": growth,
                     "run": result.as_dict()}

    # --- the report ---------------------------------------------------------------------

    def result(self, baseline: Side | None, worker: Side | None,
               duration: float) -> dict[str, Any]:
        """Everything measured, headline figures at the top level."""
        worker_runs = {mix: run.as_dict() for mix, run in (worker.runs if worker else {}).items()}
        baseline_runs = {mix: run.as_dict()
                         for mix, run in (baseline.runs if baseline else {}).items()}

        def rate(runs: dict[str, Any], mix: str) -> float | None:
            value = (runs.get(mix) or {}).get("cmds_per_s")
            return float(value) if value else None

        vs_baseline = {mix: _ratio(rate(worker_runs, mix), rate(baseline_runs, mix))
                       for mix in plan.MIXES}
        headline_worker = rate(worker_runs, plan.HEADLINE_MIX)
        postgres = self.ceilings.get("postgres") or {}
        hashing = self.ceilings.get("hash") or {}
        hash_share = _ratio(rate(worker_runs, plan.HASHING_MIX), hashing.get("ceiling_per_s"))
        growth = self.soak.get("growth", {})
        per_process = growth.get("per_process_pct")
        rss_growth = max(per_process.values()) if per_process else growth.get("total_pct")
        no_hash = [value for mix, value in vs_baseline.items() if mix != plan.HASHING_MIX]
        measured = [value for value in no_hash if value is not None]
        slowest = min(measured) if measured and len(measured) == len(no_hash) else None
        p99 = self.latency.get("p99_ms")
        result: dict[str, Any] = {
            "baseline_cmds_per_s": rate(baseline_runs, plan.HEADLINE_MIX),
            "worker_cmds_per_s": headline_worker,
            "ratio_vs_baseline": vs_baseline[plan.HEADLINE_MIX],
            "users_create_ratio_vs_hash_ceiling": hash_share,
            "p50_ms_at_half_peak": self.latency.get("p50_ms"),
            "p99_ms_at_half_peak": p99,
            "rss_growth_pct": rss_growth,
            "worker_command": " ".join(plan.command_line(
                self.options.worker_command, concurrency=self.options.concurrency,
                queue=plan.WORKER_QUEUE)),
            "concurrency": self.options.concurrency,
            "cores": plan.cores(),
            "mode": "quick" if self.options.quick else "full",
            "sizes": {"commands": self.sizes.commands,
                      "baseline_commands": self.sizes.baseline_commands,
                      "users_create_commands": self.users_create_count,
                      "soak": self.sizes.soak, "latency_seconds": self.sizes.latency_seconds},
            "servers": {"throwaway": self.stack.throwaway, **self.server_versions()},
            "machine_before_start": self.idle_check,
            "ceilings": self.ceilings,
            "ratios": {
                "vs_baseline": vs_baseline,
                "slowest_non_hashing_vs_baseline": slowest,
                "posts_create_vs_pg_single_row_tx": _ratio(
                    headline_worker, postgres.get("single_row_tx_per_s")),
                "posts_create_vs_pg_multi_row_rows": _ratio(
                    headline_worker, postgres.get("multi_row_rows_per_s")),
                "users_create_vs_hash_ceiling": hash_share,
                "users_create_vs_one_core_alone_x_processes": _ratio(
                    rate(worker_runs, plan.HASHING_MIX), hashing.get("alone_x_processes_per_s")),
            },
            "baseline": baseline_runs,
            "worker": worker_runs,
            "latency": self.latency,
            "soak": self.soak,
            "duration_s": round(duration, 1),
            "errors": self.errors,
        }
        single = [ratio for mix, ratio in vs_baseline.items()
                  if mix not in (plan.HASHING_MIX, plan.SOAK_MIX) and ratio is not None]
        slowest_single = min(single) if single else None
        mixed = vs_baseline.get(plan.SOAK_MIX)
        result["targets"] = {
            f"every single-command mix >= {SPEEDUP_TARGET:g}x baseline": _target(
                slowest_single, slowest_single is not None and slowest_single >= SPEEDUP_TARGET),
            f"realistic mix >= {MIXED_SPEEDUP_TARGET:g}x baseline": _target(
                mixed, mixed is not None and mixed >= MIXED_SPEEDUP_TARGET),
            f"users.create >= {HASH_SHARE_TARGET:.0%} of hash ceiling": _target(
                hash_share, hash_share is not None and hash_share >= HASH_SHARE_TARGET),
            f"p99 at half peak < {P99_TARGET_MS:g} ms": _target(
                p99, p99 is not None and p99 < P99_TARGET_MS),
            f"RSS growth per process <= {RSS_FLAT_PCT:g}%": _target(
                rss_growth, rss_growth is not None and rss_growth <= RSS_FLAT_PCT),
        }
        return result

    def server_versions(self) -> dict[str, Any]:
        """PostgreSQL and Redis versions and the durability settings that cost time."""
        versions: dict[str, Any] = {}
        with contextlib.suppress(redis.RedisError):
            versions["redis"] = self.broker.info("server").get("redis_version")
            versions["redis_appendonly"] = self.broker.config_get("appendonly").get("appendonly")
        with contextlib.suppress(Exception), \
                contextlib.closing(connect(self.stack.server_url)) as connection, \
                connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            versions["postgres"] = cursor.fetchone()[0]
            for setting in ("synchronous_commit", "fsync", "full_page_writes", "wal_init_zero",
                            "track_commit_timestamp", "min_wal_size", "autovacuum"):
                cursor.execute(f"SHOW {setting}")
                versions[f"postgres_{setting}"] = cursor.fetchone()[0]
        return versions


def machine_idle_check(seconds: float = 1.0) -> dict[str, float]:
    """How busy the machine is (all cores, %) over `seconds`, before anything starts."""
    return {"busy_pct": float(psutil.cpu_percent(interval=seconds)), "seconds": seconds}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def _target(value: float | None, met: bool) -> dict[str, Any]:
    return {"value": value, "met": met if value is not None else None}


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(options: Options) -> int:
    """Run the benchmark; print tables (or one JSON object); 0 when every phase ran."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="bench-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        with Ui(options.progress) as ui, \
                open_stack(options.database_url, options.broker_url, options.data_dir,
                           redis_aof=options.redis_aof) as stack:
            result = Benchmark(options, stack, ui, log_dir).run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result["errors"]:
        result["logs"] = str(log_dir)
    elif options.log_dir is None:
        shutil.rmtree(log_dir, ignore_errors=True)
    if options.json:
        print(json.dumps(result))
    else:
        from rich.console import Console

        console = Console()
        for table in tables(result):
            console.print(table)
        for error in result["errors"]:
            console.print(f"[red]{error['phase']} failed:[/] {error['error']}", highlight=False)
        if result["errors"]:
            console.print(f"Consumer logs: {log_dir}")
    return 1 if result["errors"] else 0
