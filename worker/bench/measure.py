"""Measured runs: drain a queued batch at full speed, or feed one at a paced rate."""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg2  # type: ignore[import-untyped]
import redis

from worker.bench.processes import (
    Consumer,
    Meters,
    PhaseError,
    cpu_ms_per_command,
    machine_load,
    tree_rss,
)
from worker.bench.stack import connect
from worker.bench.workload import Batch, push

MB = 1024 * 1024
Report = Callable[[int], None]


class Monitor:
    """The harness's one connection to a database (its backend's CPU is billed to the harness)."""

    def __init__(self, url: str) -> None:
        """Connect (autocommit)."""
        self.connection = connect(url)
        self.connection.autocommit = True
        self.backend_pid = int(self.rows("SELECT pg_backend_pid()")[0][0])

    def rows(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[Any]:
        """Every row of a query."""
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())

    def value(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Any:
        """The first column of the first row."""
        return self.rows(sql, params)[0][0]

    def checkpoints(self) -> int | None:
        """Checkpoints the server has done so far (timed and requested)."""
        for sql in ("SELECT num_timed + num_requested FROM pg_stat_checkpointer",
                    "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"):
            with contextlib.suppress(psycopg2.Error):
                return int(self.value(sql))
        return None

    def checkpoint(self) -> None:
        """Clean up after the run before, so that this one does not pay for it.

        VACUUM (ANALYZE) clears the dead rows and refreshes the statistics the run before
        left (autovacuum would otherwise do it in the middle of this run's few seconds), and
        CHECKPOINT writes every dirty buffer.
        """
        with contextlib.suppress(psycopg2.Error), self.connection.cursor() as cursor:
            cursor.execute("VACUUM (ANALYZE)")  # alone: VACUUM refuses a multi-statement string
        with contextlib.suppress(psycopg2.Error):  # needs superuser or pg_checkpoint
            self.rows("CHECKPOINT; SELECT 1")

    def close(self) -> None:
        """Disconnect."""
        with contextlib.suppress(psycopg2.Error):
            self.connection.close()


# --- how far a run has got ------------------------------------------------------------------

def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching the command ids of a batch."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "-%"


class LedgerProgress:
    """This worker's progress: its ledger rows (applied) and dead letters (rejected).

    When each command was applied is its transaction's commit time where the server keeps
    commit timestamps (`track_commit_timestamp`, on for the benchmark's own server); elsewhere
    it is the ledger's `applied_at`, taken by the last statement before the commit, so it
    leaves out the commit itself (`clock` says which).
    """

    def __init__(self, monitor: Monitor, prefix: str) -> None:
        """Watch the commands whose ids start with `prefix`."""
        self.monitor = monitor
        self.pattern = like_prefix(prefix)
        self.rejected = 0
        if monitor.value("SHOW track_commit_timestamp") == "on":
            self.clock = "commit"
            self._at = "extract(epoch FROM pg_xact_commit_timestamp(xmin))"
        else:
            self.clock = "last statement before commit"
            self._at = "extract(epoch FROM applied_at)"

    def __call__(self) -> int:
        """Commands with an outcome so far."""
        applied, rejected = self.monitor.rows(
            "SELECT (SELECT count(*) FROM command_ledger WHERE command_id LIKE %(p)s), "
            "(SELECT count(*) FROM dead_letters WHERE command_id LIKE %(p)s)",
            {"p": self.pattern})[0]
        self.rejected = int(rejected)
        return int(applied) + self.rejected

    def applied_times(self) -> list[float]:
        """When each applied command was recorded (server clock, epoch seconds), in order."""
        return sorted(float(row[0]) for row in self.monitor.rows(
            f"SELECT {self._at} FROM command_ledger WHERE command_id LIKE %(p)s",
            {"p": self.pattern}))

    def applied_at(self) -> dict[str, float]:
        """Command id -> when it was recorded (epoch seconds)."""
        return {str(key): float(at) for key, at in self.monitor.rows(
            f"SELECT command_id, {self._at} FROM command_ledger WHERE command_id LIKE %(p)s",
            {"p": self.pattern})}


def _span(ids: list[int]) -> tuple[int, int]:
    low, high = min(ids), max(ids)
    if high - low + 1 != len(ids):
        raise ValueError("seeded posts must have consecutive ids")
    return low, high


class TableProgress:
    """The baseline's progress, read from the tables its commands change (it keeps no ledger)."""

    def __init__(self, monitor: Monitor, batch: Batch) -> None:
        """Take the snapshot that later counts are compared with."""
        self.monitor = monitor
        counts = batch.counts
        m = monitor
        self.params: dict[str, Any] = {
            "post_max": m.value("SELECT coalesce(max(id), 0) FROM posts"),
            "tag_max": m.value("SELECT coalesce(max(id), 0) FROM tags"),
            "user_max": m.value("SELECT coalesce(max(id), 0) FROM users"),
        }
        parts = []
        if counts.get("posts.create"):
            parts.append("(SELECT count(*) FROM posts WHERE id > %(post_max)s)")
        if counts.get("tags.create"):
            parts.append("(SELECT count(*) FROM tags WHERE id > %(tag_max)s)")
        if counts.get("users.create"):
            parts.append("(SELECT count(*) FROM users WHERE id > %(user_max)s)")
        if counts.get("users.update"):
            # Every update adds one to a version.
            self.params["user_versions"] = m.value(
                "SELECT coalesce(sum(version), 0) FROM users WHERE id <= %(user_max)s",
                self.params)
            parts.append("((SELECT coalesce(sum(version), 0) FROM users "
                         "WHERE id <= %(user_max)s) - %(user_versions)s)")
        if counts.get("posts.update"):
            self.params["upd_lo"], self.params["upd_hi"] = _span(batch.targets["posts.update"])
            self.params["post_versions"] = m.value(
                "SELECT coalesce(sum(version), 0) FROM posts "
                "WHERE id BETWEEN %(upd_lo)s AND %(upd_hi)s", self.params)
            parts.append("((SELECT coalesce(sum(version), 0) FROM posts "
                         "WHERE id BETWEEN %(upd_lo)s AND %(upd_hi)s) - %(post_versions)s)")
        if counts.get("posts.delete"):
            self.params["del_lo"], self.params["del_hi"] = _span(batch.targets["posts.delete"])
            self.params["del_count"] = counts["posts.delete"]
            parts.append("(%(del_count)s - (SELECT count(*) FROM posts "
                         "WHERE id BETWEEN %(del_lo)s AND %(del_hi)s))")
        self.sql = "SELECT " + " + ".join(parts)

    def __call__(self) -> int:
        """Commands whose effect is visible so far."""
        return int(self.monitor.value(self.sql, self.params))


# --- rates ----------------------------------------------------------------------------------

STEADY = (0.05, 0.95)
LUMP_SECONDS = 0.001
MIN_LUMPS = 8


@dataclass(frozen=True)
class Rate:
    """A measured steady rate."""

    per_second: float
    window_s: float
    how: str


def rate_from_times(times: Sequence[float], started_at: float) -> Rate | None:
    """The steady rate from sorted commit timestamps (epoch seconds).

    Steady state is the 5% to 95% span, counting only commits after its first instant (a
    batch committed at that instant was worked on before it). When commits come in too few
    lumps for that (big batches, few commands), the whole run from `started_at` is used.
    """
    count = len(times)
    if count == 0:
        return None
    low = times[math.floor(STEADY[0] * count)]
    high = times[max(0, math.ceil(STEADY[1] * count) - 1)]
    lumps = sum(1 for earlier, later in itertools.pairwise(times)
                if low <= earlier and later <= high and later - earlier > LUMP_SECONDS)
    if lumps >= MIN_LUMPS and high > low:
        done = bisect.bisect_right(times, high) - bisect.bisect_right(times, low)
        return Rate(done / (high - low), high - low,
                    f"ledger, 5% to 95% ({lumps} commit instants)")
    if times[-1] <= started_at:
        return None
    return Rate(count / (times[-1] - started_at), times[-1] - started_at,
                f"ledger, whole run (only {lumps} commit instants in 5% to 95%)")


def _crossing(samples: Sequence[tuple[float, int]], level: float) -> float:
    """When the polled count first reached `level` (linear between samples)."""
    previous = samples[0]
    for sample in samples[1:]:
        if sample[1] >= level:
            span = sample[1] - previous[1]
            share = (level - previous[1]) / span if span else 1.0
            return previous[0] + share * (sample[0] - previous[0])
        previous = sample
    return samples[-1][0]


def rate_from_samples(samples: Sequence[tuple[float, int]], total: int) -> Rate | None:
    """The steady rate between the 5% and 95% completions, from polled counts."""
    start, end = _crossing(samples, STEADY[0] * total), _crossing(samples, STEADY[1] * total)
    if end <= start:
        return None
    return Rate((STEADY[1] - STEADY[0]) * total / (end - start), end - start,
                "polled table counts, 5% to 95%")


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile of sorted `values`."""
    rank = max(1, math.ceil(share * len(values)))
    return values[min(rank, len(values)) - 1]


# --- runs -----------------------------------------------------------------------------------

def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _mb(size: int) -> float:
    return round(size / MB, 1)


@dataclass(frozen=True)
class RssMark:
    """The consumer's resident memory per pid when a share of a run was done."""

    done_pct: int
    at_s: float
    rss: dict[int, int]

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"done_pct": self.done_pct, "at_s": round(self.at_s, 2),
                "total_mb": _mb(sum(self.rss.values())),
                "per_process_mb": [_mb(size) for size in self.rss.values()]}


def rss_growth_pct(start: dict[int, int], end: dict[int, int]) -> dict[str, Any]:
    """Growth of the total and of each process present at both points, in percent."""
    both = [pid for pid in start if pid in end and start[pid]]
    total = sum(start.values())
    return {"total_pct": round((sum(end.values()) - total) * 100 / total, 2) if total else None,
            "per_process_pct": {str(pid): round((end[pid] - start[pid]) * 100 / start[pid], 2)
                                for pid in both},
            "replaced_processes": len(set(start) ^ set(end))}


@dataclass
class RunResult:
    """What one drain measured."""

    commands: int
    cmds_per_s: float | None
    window_s: float | None
    rate_from: str
    rejected: int
    wall_s: float
    cpu_ms_per_cmd: dict[str, float | None]
    machine: dict[str, float | None]
    rss_start: dict[int, int]
    rss_end: dict[int, int]
    rss_marks: list[RssMark] = field(default_factory=list)
    checkpoints: int | None = None
    #: When the consumer was let go on the queued run (epoch seconds).
    started_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "commands": self.commands,
            "started_at": _round(self.started_at, 3),
            "cmds_per_s": _round(self.cmds_per_s),
            "window_s": _round(self.window_s, 3),
            "rate_from": self.rate_from,
            "rejected": self.rejected,
            "wall_s": round(self.wall_s, 3),
            "cpu_ms_per_cmd": self.cpu_ms_per_cmd,
            "machine": self.machine,
            "checkpoints_during": self.checkpoints,
            "rss_mb": {
                "start_total": _mb(sum(self.rss_start.values())),
                "end_total": _mb(sum(self.rss_end.values())),
                "start_per_process": [_mb(v) for v in self.rss_start.values()],
                "end_per_process": [_mb(v) for v in self.rss_end.values()],
            },
            **({"rss_marks": [mark.as_dict() for mark in self.rss_marks]}
               if self.rss_marks else {}),
        }


@dataclass
class Drain:
    """Everything a drain needs: who consumes, what to send where, and how to see progress."""

    consumer: Consumer
    meters: Meters
    broker: redis.Redis
    queue: str
    batch: Batch
    progress: Callable[[], int]
    stall_seconds: float
    monitor: Monitor
    poll_seconds: float = 0.2
    rss_every: float | None = None


def drain(run: Drain, report: Report,
          exact_times: Callable[[], Sequence[float]] | None = None) -> RunResult:
    """Queue the whole batch while the consumer is paused, then time it until all are done."""
    total = len(run.batch)
    messages = run.batch.encoded(run.queue)
    run.consumer.check_alive()
    run.monitor.checkpoint()
    checkpoints = run.monitor.checkpoints()
    rss_start = tree_rss(run.consumer.pid)
    cpu_before = run.meters.cpu()
    run.consumer.pause()
    try:
        push(run.broker, run.queue, messages)
    finally:
        resumed_at = time.time()
        run.consumer.resume()
    del messages
    started = time.monotonic()
    samples: list[tuple[float, int]] = [(started, 0)]
    marks: list[RssMark] = []
    next_mark = run.rss_every
    moved_at, done = started, 0
    while done < total:
        time.sleep(run.poll_seconds)
        now_done = run.progress()
        now = time.monotonic()
        samples.append((now, now_done))
        report(now_done)
        if now_done > done:
            moved_at, done = now, now_done
        elif now - moved_at > run.stall_seconds:
            run.consumer.check_alive()
            raise PhaseError(f"{run.consumer.name} stalled at {done}/{total} for "
                             f"{run.stall_seconds:.0f} s:\n{run.consumer.log_tail()}")
        while next_mark is not None and done >= next_mark * total and next_mark <= 1:
            marks.append(RssMark(round(100 * next_mark), now - started,
                                 tree_rss(run.consumer.pid)))
            next_mark = round(next_mark + (run.rss_every or 1), 6)
    cpu_after = run.meters.cpu()
    checkpoints_after = run.monitor.checkpoints()
    rss_end = tree_rss(run.consumer.pid)
    wall = time.monotonic() - started
    rejected = int(getattr(run.progress, "rejected", 0))
    measured = rate_from_times(exact_times(), resumed_at) if exact_times is not None else None
    measured = measured or rate_from_samples(samples, total)
    return RunResult(total, measured.per_second if measured else None,
                     measured.window_s if measured else None,
                     measured.how if measured else "none", rejected, wall,
                     cpu_ms_per_command(cpu_before, cpu_after, total),
                     machine_load(cpu_before, cpu_after), rss_start, rss_end, marks,
                     _difference(checkpoints, checkpoints_after), resumed_at)


def _difference(before: int | None, after: int | None) -> int | None:
    return after - before if before is not None and after is not None else None


@dataclass
class LatencyResult:
    """Publish-to-commit latency at a paced offered load."""

    offered_per_s: float
    sent_per_s: float
    commands: int
    latencies_ms: list[float]
    missing: int
    checkpoints: int | None = None
    per_second: list[tuple[int, float, float]] = field(default_factory=list)
    machine: dict[str, float | None] = field(default_factory=dict)
    until: str = "commit"
    #: The longest time in the run during which no command of it committed (see commit_gap).
    longest_commit_gap_ms: float | None = None
    #: PostgreSQL's WAL flushes during the run (WalFlushes.stop), when it could be read.
    wal_flushes: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        values = sorted(self.latencies_ms)
        stats: dict[str, float | None] = {"p50_ms": None, "p90_ms": None, "p99_ms": None,
                                          "max_ms": None}
        if values:
            stats = {"p50_ms": round(percentile(values, 0.50), 2),
                     "p90_ms": round(percentile(values, 0.90), 2),
                     "p99_ms": round(percentile(values, 0.99), 2),
                     "max_ms": round(values[-1], 2)}
        return {"offered_per_s": round(self.offered_per_s, 1),
                "sent_per_s": round(self.sent_per_s, 1), "commands": self.commands,
                "from": "LPUSH", "until": self.until,
                "missing": self.missing, **stats, "checkpoints_during": self.checkpoints,
                "longest_commit_gap_ms": self.longest_commit_gap_ms,
                "wal_flushes": self.wal_flushes,
                "machine": self.machine,
                "per_second": [{"second": second, "p50_ms": round(p50, 1),
                                "max_ms": round(worst, 1)}
                               for second, p50, worst in self.per_second]}


def commit_gap(published: Sequence[float], committed: Sequence[float]) -> float | None:
    """The longest time (ms) between the first publish and the last commit in which none of
    the commands committed.

    At a steady offered load a batch commits every few milliseconds, so a long gap is a
    stall: the whole pipeline waiting on one thing (in this benchmark's runs, most often
    PostgreSQL waiting for the disk to flush its WAL: a commit's timestamp is taken before
    that flush, and every later commit waits behind it).
    """
    if not published or not committed:
        return None
    times = sorted({min(published), *committed})
    return round(max((b - a for a, b in itertools.pairwise(times)), default=0.0) * 1000, 1)


def by_second(published: Sequence[float], latencies: Sequence[float | None]
              ) -> list[tuple[int, float, float]]:
    """(second since the first publish, median, max) of the latencies, per second published."""
    groups: dict[int, list[float]] = {}
    start = min(published) if published else 0.0
    for at, latency in zip(published, latencies, strict=True):
        if latency is not None:
            groups.setdefault(int(at - start), []).append(latency)
    return [(second, percentile(sorted(values), 0.5), max(values))
            for second, values in sorted(groups.items())]


class WalFlushes:
    """How long PostgreSQL spent flushing its WAL during a run, sampled once a second.

    From the server's cumulative statistics (`pg_stat_io` from PostgreSQL 18, `pg_stat_wal`
    before), on a connection and thread of their own; the times need `track_wal_io_timing`
    (on in the throwaway server). Backends add their counts every second or so, so the most
    added between two samples is about the most flushing time in one second: a commit
    waiting 200 ms for the disk shows there as 200 ms or more.
    """

    QUERIES = ("SELECT sum(fsyncs), sum(fsync_time) FROM pg_stat_io WHERE object = 'wal'",
               "SELECT wal_sync, wal_sync_time FROM pg_stat_wal")

    def __init__(self, url: str, interval: float = 1.0) -> None:
        self.url = url
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._query: str | None = None
        self._monitor: Monitor | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Take the first sample and go on in the background (nothing if it cannot be read)."""
        try:
            self._monitor = Monitor(self.url)
            timed = self._monitor.value("SHOW track_wal_io_timing") == "on"
            for query in self.QUERIES:
                with contextlib.suppress(psycopg2.Error):
                    self._monitor.rows(query)
                    self._query = query
                    break
        except psycopg2.Error:
            return
        if self._query is None or not timed:
            return
        self._sample()
        self._thread = threading.Thread(target=self._run, name="wal-flushes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        assert self._monitor is not None and self._query is not None
        with contextlib.suppress(psycopg2.Error):
            count, spent = self._monitor.rows(self._query)[0]
            self.samples.append((float(count or 0), float(spent or 0.0)))

    def stop(self) -> dict[str, float] | None:
        """Stop sampling (again: nothing more); the flushes, their time and the most time in
        one second (ms)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample()
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if len(self.samples) < 2:
            return None
        steps = [later[1] - earlier[1]
                 for earlier, later in itertools.pairwise(self.samples)]
        return {"flushes": self.samples[-1][0] - self.samples[0][0],
                "flush_ms": round(self.samples[-1][1] - self.samples[0][1], 1),
                "most_in_one_second_ms": round(max(steps), 1)}


class LeanPublisher:
    """Sends each message as its own LPUSH, in as little of the machine's CPU as it can.

    The benchmark's publisher shares the machine with the worker, PostgreSQL and Redis; on two
    cores, a client library's per-call work (some 80 us a message) would take a sixth of a
    core from the worker at a few thousand messages a second, which producers on other
    machines do not. So every LPUSH is packed before the clock starts, the ones due at a tick
    leave in one write (still one LPUSH a message, as separate producers send them), and the
    replies are read after the last send (each is checked: an error reply fails the phase).
    """

    def __init__(self, broker: redis.Redis, queue: str, messages: Sequence[bytes]) -> None:
        # redis-py types its connections loosely (untyped methods): used as Any.
        connection: Any = broker.connection_pool.make_connection()
        connection.connect()
        self.connection = connection
        self.packed = [b"".join(connection.pack_command("LPUSH", queue, message))
                       for message in messages]
        self.sent = 0

    def send(self, start: int, end: int) -> None:
        """Send the LPUSHes of messages[start:end] in one write."""
        self.connection.send_packed_command([b"".join(self.packed[start:end])],
                                            check_health=False)
        self.sent += end - start

    def confirm(self) -> None:
        """Read a reply for every LPUSH sent (an error reply raises ResponseError)."""
        for _ in range(self.sent):
            self.connection.read_response()
        self.sent = 0

    def close(self) -> None:
        self.connection.disconnect()


def _share_of_a_core(start: float | None, end: float | None, wall: float) -> float | None:
    if start is None or end is None or wall <= 0:
        return None
    return round((end - start) * 100 / wall, 1)


def paced(consumer: Consumer, meters: Meters, broker: redis.Redis, queue: str, batch: Batch,
          rate: float, progress: LedgerProgress, stall_seconds: float,
          report: Report, flushes: WalFlushes | None = None) -> LatencyResult:
    """Publish `batch` at `rate` per second, then read each command's commit time (and, with
    `flushes`, how long PostgreSQL spent flushing its WAL meanwhile)."""
    total = len(batch)
    published: list[float] = [0.0] * total
    with contextlib.ExitStack() as cleanup:  # the publisher and the sampler end with the phase
        publisher = LeanPublisher(broker, queue, batch.encoded(queue))
        cleanup.callback(publisher.close)
        consumer.check_alive()
        progress.monitor.checkpoint()
        checkpoints = progress.monitor.checkpoints()
        if flushes is not None:
            flushes.start()
            cleanup.callback(flushes.stop)
        cpu_before = meters.cpu()
        started = time.monotonic()
        sent = 0
        while sent < total:
            due = min(total, int((time.monotonic() - started) * rate) + 1)
            if due > sent:
                at = time.time()
                publisher.send(sent, due)
                published[sent:due] = [at] * (due - sent)
                sent = due
                report(sent // 2)
            else:
                time.sleep(min(0.002, (due + 1 - sent) / rate))
        sent_rate = total / max(1e-9, time.monotonic() - started)
        publisher.confirm()
        cpu_published = meters.cpu()
        consumer.check_alive()
        deadline = time.monotonic() + stall_seconds
        while (done := progress()) < total:
            report(total // 2 + done // 2)
            if time.monotonic() > deadline:
                raise PhaseError(f"{consumer.name}: {done}/{total} paced commands applied "
                                 f"after {stall_seconds:.0f} s:\n{consumer.log_tail()}")
            consumer.check_alive()
            time.sleep(0.1)
        report(total)
        flushed = flushes.stop() if flushes is not None else None
    load = {**machine_load(cpu_before, meters.cpu()),
            "publisher_pct_of_a_core": _share_of_a_core(cpu_before.harness,
                                                        cpu_published.harness,
                                                        cpu_published.at - cpu_before.at)}
    checkpoints_after = progress.monitor.checkpoints()
    applied = progress.applied_at()
    each = [(applied[batch.command_id(i)] - published[i]) * 1000
            if batch.command_id(i) in applied else None for i in range(total)]
    latencies = [latency for latency in each if latency is not None]
    return LatencyResult(rate, sent_rate, total, latencies, total - len(latencies),
                         _difference(checkpoints, checkpoints_after), by_second(published, each),
                         load, progress.clock, commit_gap(published, list(applied.values())),
                         flushed)
