"""`python -m worker bench`: ceilings, a tutorial-style baseline and this worker, in one run.

Every figure comes from the same servers in the same run, so ratios can be compared on a
noisy machine. Throughput is steady state: commands are queued before the consumer
starts, and the clock runs from 5% to 95% of them applied (start-up excluded).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import psycopg2  # type: ignore[import-untyped]
import redis
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import create_engine, make_url, text

from worker.protocol import encode
from worker.runner import migrate
from worker.security import hash_password, password_hasher

ROOT = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 2
PASSWORD = "benchmark-password"  # noqa: S105 - test data


@dataclass
class Sizes:
    """How many commands each phase uses."""

    commands: int
    baseline_commands: int
    users_create: int
    latency_seconds: float
    soak: int
    ceiling_seconds: float


# The baseline is ~30 times slower: fewer commands give it the same steady state.
FULL = Sizes(commands=20_000, baseline_commands=3_000, users_create=600, latency_seconds=15,
             soak=100_000, ceiling_seconds=3)
QUICK = Sizes(commands=1_000, baseline_commands=300, users_create=40, latency_seconds=2,
              soak=2_000, ceiling_seconds=1)


@dataclass
class Run:
    """One measured drain of a queue."""

    commands: int
    per_second: float
    cpu_ms: dict[str, float | None] = field(default_factory=dict)
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0


# --- servers and databases ----------------------------------------------------------------

@dataclass
class Stack:
    """The servers the benchmark runs on, and the processes whose CPU it counts."""

    server_url: str
    broker_url: str
    postgres_pid: int | None
    redis_pid: int | None


@contextmanager
def servers(database_url: str | None, broker_url: str | None) -> Iterator[Stack]:
    """The given servers, or throwaway ones (Redis with its append-only file, as in use)."""
    if database_url and broker_url:
        yield Stack(database_url, broker_url, None, None)
        return
    from worker.servers import EmbeddedPostgres, EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="bench-") as base, ExitStack() as stack:
        postgres = stack.enter_context(EmbeddedPostgres(Path(base) / "pg"))
        redis_server = stack.enter_context(EmbeddedRedis(Path(base) / "redis"))
        yield Stack(postgres.url, redis_server.url, postgres.pid, redis_server.pid)


def fresh_database(server_url: str, migrated: bool = True) -> str:
    """A new database on the server, migrated to head; its URL."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    if migrated:
        migrate(url)
    return url


def sql(url: str, statement: str, params: dict[str, Any] | None = None) -> Any:
    """Run one statement; the first column of the first row, if any."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(statement), params or {})
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def seed(url: str, users: int, posts: int) -> None:
    """Authors (ids 1..users), posts (ids 1..posts) and the tags posts.create names.

    With the tags there up front, the baseline's check-then-insert of a tag never races
    another process (a race it would lose with an IntegrityError, failing the command).
    """
    sql(url, "INSERT INTO tags (name, version) SELECT 'tag' || i, 1 "
             "FROM generate_series(0, 49) AS i")
    sql(url, "INSERT INTO users (username, email, hashed_password, version) "
             "SELECT 'seed' || i, 'seed' || i || '@example.com', :h, 1 "
             "FROM generate_series(1, :n) AS i", {"n": users, "h": hash_password(PASSWORD)})
    if posts:
        sql(url, "INSERT INTO posts (title, author_id, version) "
                 "SELECT 'seed ' || i, 1 + i % :u, 1 FROM generate_series(1, :n) AS i",
            {"n": posts, "u": users})


# --- commands -----------------------------------------------------------------------------

Command = tuple[str, dict[str, Any]]


def mix(name: str, count: int, authors: int, posts: int) -> list[Command]:
    """`count` commands of a named mix (unique command ids, valid data)."""
    run_id = uuid.uuid4().hex[:8]
    made: list[Command] = []
    updated_users = iter(range(1, 10**9))
    deleted_posts = iter(range(1, posts + 1))
    updated_posts = iter(range(posts, 0, -1))
    for i in range(count):
        key = f"{name}-{run_id}-{i}"
        kind = name
        if name == "mixed":
            slot = i % 10
            kind = ("posts.create" if slot < 4 else "tags.create" if slot < 6 else
                    "users.update" if slot < 8 else "posts.update" if slot < 9 else
                    "posts.delete")
        if kind == "posts.create":
            made.append((kind, {"command_id": key, "data": {
                "title": f"title {i}", "content": "body " * 20,
                "author_id": 1 + i % authors, "tags": [f"tag{i % 25}", f"tag{25 + i % 7}"]}}))
        elif kind == "tags.create":
            made.append((kind, {"command_id": key, "data": {"name": f"t-{run_id}-{i}"}}))
        elif kind == "users.update":
            user = 1 + next(updated_users) % authors
            made.append((kind, {"command_id": key, "id": user,
                                "data": {"is_active": i % 2 == 0}}))
        elif kind == "posts.update":
            made.append((kind, {"command_id": key, "id": next(updated_posts),
                                "data": {"title": f"new {i}", "tags": ["edited"]}}))
        elif kind == "posts.delete":
            made.append((kind, {"command_id": key, "id": next(deleted_posts)}))
        elif kind == "users.create":
            made.append((kind, {"command_id": key, "data": {
                "username": f"u-{run_id}-{i}", "email": f"u-{run_id}-{i}@example.com",
                "password": PASSWORD}}))
    return made


def enqueue(broker_url: str, queue: str, commands: list[Command]) -> None:
    """Put the commands on the queue as Celery's send_task would, in pipelined chunks."""
    client = redis.Redis.from_url(broker_url)
    for start in range(0, len(commands), 2000):
        chunk = commands[start:start + 2000]
        client.lpush(queue, *[encode(task, kwargs, queue=queue) for task, kwargs in chunk])
    client.close()


# --- processes ------------------------------------------------------------------------------

def tree_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) of a process and its children, or None."""
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
            except psutil.NoSuchProcess:
                continue
        return total
    except psutil.NoSuchProcess:
        return None


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process tree, MiB."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


@dataclass
class Consumer:
    """A consumer subprocess and the file its output goes to."""

    child: subprocess.Popen[bytes]
    log: Any

    def output(self) -> str:
        """The last of what it printed."""
        self.log.seek(0)
        return str(self.log.read().decode(errors="replace"))[-3000:]


@contextmanager
def process(command: list[str], env: dict[str, str]) -> Iterator[Consumer]:
    """A consumer subprocess (output in a temporary file), stopped with SIGTERM afterwards."""
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield Consumer(child, log)
        finally:
            child.terminate()
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def this_worker(database_url: str, broker_url: str, queue: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of this worker: the batch consumer, all guarantees on."""
    env = {**os.environ, "DATABASE_URL": database_url, "BROKER_URL": broker_url,
           "COMMANDS_QUEUE": queue}
    env.pop("RESULT_BACKEND", None)
    return ([sys.executable, "-m", "worker.batch", "--concurrency", str(CORES),
             "--batch-size", "100", "--loglevel", "WARNING"], env)


def baseline_worker(database_url: str, broker_url: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of the tutorial-style baseline."""
    from worker.bench_baseline import QUEUE

    env = {**os.environ, "BENCH_DATABASE_URL": database_url, "BENCH_BROKER_URL": broker_url}
    return ([sys.executable, "-m", "celery", "-A", "worker.bench_baseline", "worker", "-Q",
             QUEUE, "-c", str(CORES), "--loglevel", "WARNING", "--without-gossip",
             "--without-mingle", "--without-heartbeat"], env)


def drain(command: list[str], env: dict[str, str], count: Callable[[], int],
          commands: list[Command], queue: str, stack: Stack, progress: Progress, label: str,
          timeout: float = 600) -> Run:
    """Throughput of a consumer that is already running (start-up excluded).

    The first command warms the consumer up; the rest are then queued at once, and the
    clock runs from 5% to 95% of them applied. Where batches make progress too coarse for
    that window (a few large commits), it runs from queueing to the last one applied.
    """
    task = progress.add_task(label, total=len(commands))
    before = {"postgres": tree_cpu(stack.postgres_pid), "redis": tree_cpu(stack.redis_pid)}
    with process(command, env) as consumer:
        child = consumer.child

        def wait_for(target: int, deadline: float) -> int:
            done = count()
            while done < target:
                if child.poll() is not None:
                    raise RuntimeError(f"{label}: the consumer exited: {consumer.output()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: {done} of {target} applied in time:\n"
                                       f"{consumer.output()}")
                time.sleep(0.02)
                done = count()
            return done

        enqueue(stack.broker_url, queue, commands[:1])
        wait_for(1, time.monotonic() + 120)
        rest = len(commands) - 1
        rss_start = tree_rss_mb(child.pid)
        cpu_start = tree_cpu(child.pid)
        queued_at = time.monotonic()
        enqueue(stack.broker_url, queue, commands[1:])
        samples: list[tuple[float, int, float | None]] = []
        deadline = time.monotonic() + timeout
        done = 1
        while done < len(commands):
            done = wait_for(min(len(commands), done + 1), deadline)
            samples.append((time.monotonic(), done - 1, tree_cpu(child.pid)))
            progress.update(task, completed=done)
        rss_end = tree_rss_mb(child.pid)
    after = {"postgres": tree_cpu(stack.postgres_pid), "redis": tree_cpu(stack.redis_pid)}
    low = next(sample for sample in samples if sample[1] >= rest // 20)
    high = next(sample for sample in samples if sample[1] >= rest - rest // 20)
    if high[1] - low[1] >= rest // 2 and high[0] - low[0] > 0.2:
        window, seconds = high[1] - low[1], high[0] - low[0]
        cpu_from, cpu_to = low[2], high[2]
    else:
        window, seconds = rest, samples[-1][0] - queued_at
        cpu_from, cpu_to = cpu_start, samples[-1][2]
    cpu: dict[str, float | None] = {}
    if cpu_from is not None and cpu_to is not None:
        cpu["worker"] = round((cpu_to - cpu_from) / window * 1000, 3)
    for name in ("postgres", "redis"):
        first, last = before[name], after[name]
        # The servers' CPU over the whole drain (warm-up included), per command.
        cpu[name] = (round((last - first) / len(commands) * 1000, 3)
                     if first is not None and last is not None else None)
    return Run(len(commands), round(window / max(seconds, 1e-6), 1), cpu, round(rss_start, 1),
               round(rss_end, 1))


def counter(url: str, statement: str) -> Callable[[], int]:
    """A cheap repeated count on one connection."""
    connection = psycopg2.connect(make_url(url).set(drivername="postgresql").render_as_string(
        hide_password=False))
    connection.autocommit = True

    def count() -> int:
        with connection.cursor() as cursor:
            cursor.execute(statement)
            return int(cursor.fetchone()[0])

    return count


# --- ceilings -----------------------------------------------------------------------------

def ceilings(server_url: str, seconds: float) -> dict[str, float]:
    """PostgreSQL single-row insert transactions/s (4 clients), 100-row insert rows/s, hash/s."""
    url = fresh_database(server_url, migrated=False)
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    sql(url, "CREATE TABLE scratch (id serial PRIMARY KEY, title varchar(200), content text, "
             "author_id int, created_at timestamptz DEFAULT now())")

    def single_rows(counts: list[int]) -> None:
        connection = psycopg2.connect(dsn)
        connection.autocommit = True
        cursor = connection.cursor()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            cursor.execute("INSERT INTO scratch (title, content, author_id) "
                           "VALUES (%s, %s, %s)", ("title", "body " * 20, 1))
            counts.append(1)
        connection.close()

    counts: list[int] = []
    threads = [threading.Thread(target=single_rows, args=(counts,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    single = len(counts) / seconds

    connection = psycopg2.connect(dsn)
    cursor = connection.cursor()
    rows = 0
    values = ",".join(["('title', 'body', 1)"] * 100)
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < deadline:
        cursor.execute(f"INSERT INTO scratch (title, content, author_id) VALUES {values}")
        connection.commit()
        rows += 100
    multi = rows / (time.monotonic() - started)
    connection.close()

    per_core = hash_rate(seconds)
    # The same hash in every core at once: what the machine really delivers (cores that
    # share caches or memory bandwidth deliver less than per-core rate x cores).
    with multiprocessing.get_context("fork").Pool(CORES) as pool:
        parallel = sum(pool.map(hash_rate, [seconds] * CORES))
    return {"pg_single_row_tx_per_s": round(single, 1), "pg_multi_row_rows_per_s": round(multi),
            "hashes_per_s_per_core": round(per_core, 1),
            "hash_ceiling_per_s": round(per_core * CORES, 1),
            "parallel_hash_ceiling_per_s": round(parallel, 1)}


def hash_rate(seconds: float) -> float:
    """argon2id hashes per second in this process, with the configured cost."""
    password_hasher()
    hashes = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        hash_password(PASSWORD)
        hashes += 1
    return hashes / (time.monotonic() - started)


# --- latency ------------------------------------------------------------------------------

def latency(stack: Stack, queue: str, rate: float, seconds: float, authors: int) -> dict[str, Any]:
    """p50/p99 ms from publish to commit at a paced, offered load of `rate` commands/s."""
    url = fresh_database(stack.server_url)
    seed(url, authors, 0)
    command, env = this_worker(url, stack.broker_url, queue)
    client = redis.Redis.from_url(stack.broker_url)
    published: dict[str, float] = {}
    with process(command, env):
        probe = mix("posts.create", 1, authors, 0)
        enqueue(stack.broker_url, queue, probe)
        count = counter(url, "SELECT count(*) FROM command_ledger")
        deadline = time.monotonic() + 60
        while count() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        commands = mix("posts.create", int(rate * seconds), authors, 0)
        started = time.monotonic()
        sent = 0
        while sent < len(commands):
            due = min(len(commands), int((time.monotonic() - started) * rate) + 1)
            if due > sent:
                pipe = client.pipeline(transaction=False)
                now = time.time()
                for task, kwargs in commands[sent:due]:
                    pipe.lpush(queue, encode(task, kwargs, queue=queue))
                    published[kwargs["command_id"]] = now
                pipe.execute()
                sent = due
            time.sleep(0.002)
        achieved = sent / (time.monotonic() - started)
        deadline = time.monotonic() + 120
        while count() < len(commands) + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    engine = create_engine(url)
    with engine.connect() as connection:
        applied = {row.command_id: row.applied_at.timestamp() for row in connection.execute(
            text("SELECT command_id, applied_at FROM command_ledger"))}
    engine.dispose()
    waits = sorted((applied[key] - at) * 1000 for key, at in published.items() if key in applied)
    return {"offered_per_s": round(rate, 1), "achieved_per_s": round(achieved, 1),
            "commands": len(waits),
            "p50_ms": round(statistics.median(waits), 2),
            "p99_ms": round(waits[min(len(waits) - 1, int(len(waits) * 0.99))], 2),
            "max_ms": round(waits[-1], 2)}


# --- the whole run ------------------------------------------------------------------------

def measure(sizes: Sizes, stack: Stack, progress: Progress) -> dict[str, Any]:
    """Every phase, in order, on one stack of servers."""
    report: dict[str, Any] = {"cores": CORES, "sizes": sizes.__dict__}
    authors, posts = 200, sizes.commands
    report["ceiling"] = ceilings(stack.server_url, sizes.ceiling_seconds)

    baseline: dict[str, Any] = {}
    for name, count in (("posts.create", sizes.baseline_commands),
                        ("users.create", sizes.users_create)):
        url = fresh_database(stack.server_url)
        seed(url, authors, 0)
        from worker.bench_baseline import QUEUE

        table = "posts" if name == "posts.create" else "users"
        offset = authors if table == "users" else 0
        counted = counter(url, f"SELECT count(*) - {offset} FROM {table}")
        command, env = baseline_worker(url, stack.broker_url)
        baseline[name] = drain(command, env, counted, mix(name, count, authors, 0), QUEUE,
                               stack, progress, f"baseline {name}").__dict__

    worker: dict[str, Any] = {}
    mixes = [("posts.create", sizes.commands), ("tags.create", sizes.commands),
             ("users.update", sizes.commands), ("posts.delete", sizes.commands),
             ("mixed", sizes.commands), ("users.create", sizes.users_create)]
    for name, count in mixes:
        url = fresh_database(stack.server_url)
        seed(url, authors, posts)
        queue = f"bench-{name}"
        command, env = this_worker(url, stack.broker_url, queue)
        counted = counter(url, "SELECT count(*) FROM command_ledger")
        worker[name] = drain(command, env, counted, mix(name, count, authors, posts), queue,
                             stack, progress, f"worker {name}").__dict__
        rejected = sql(url, "SELECT count(*) FROM dead_letters")
        worker[name]["dead_letters"] = rejected

    peak = worker["posts.create"]["per_second"]
    # Flush what the throughput phases wrote, so their checkpoint does not land in this one.
    sql(stack.server_url, "CHECKPOINT")
    report["latency"] = latency(stack, "bench-latency", peak / 2, sizes.latency_seconds, authors)

    url = fresh_database(stack.server_url)
    seed(url, authors, 0)
    command, env = this_worker(url, stack.broker_url, "bench-soak")
    soak = drain(command, env, counter(url, "SELECT count(*) FROM command_ledger"),
                 mix("posts.create", sizes.soak, authors, 0), "bench-soak", stack, progress,
                 "soak posts.create")
    report["soak"] = soak.__dict__

    report["baseline"] = baseline
    report["worker"] = worker
    base = baseline["posts.create"]["per_second"]
    report["baseline_cmds_per_s"] = base
    report["worker_cmds_per_s"] = peak
    report["ratio_vs_baseline"] = round(peak / base, 2)
    report["ratio_vs_pg_single_row_tx"] = round(peak / report["ceiling"]["pg_single_row_tx_per_s"],
                                                3)
    report["ratio_vs_pg_multi_row"] = round(peak / report["ceiling"]["pg_multi_row_rows_per_s"], 3)
    report["users_create_ratio_vs_hash_ceiling"] = round(
        worker["users.create"]["per_second"] / report["ceiling"]["hash_ceiling_per_s"], 3)
    report["users_create_ratio_vs_parallel_hash_ceiling"] = round(
        worker["users.create"]["per_second"] / report["ceiling"]["parallel_hash_ceiling_per_s"], 3)
    report["users_create_ratio_vs_baseline"] = round(
        worker["users.create"]["per_second"] / baseline["users.create"]["per_second"], 2)
    report["p99_ms_at_half_peak"] = report["latency"]["p99_ms"]
    report["rss_growth_pct"] = round(
        (soak.rss_end_mb - soak.rss_start_mb) / max(soak.rss_start_mb, 1e-6) * 100, 2)
    return report


def table(report: dict[str, Any]) -> Table:
    """The results for people."""
    out = Table(title=f"command-worker benchmark ({report['cores']} cores)")
    for column in ("what", "commands/s", "vs baseline", "worker CPU ms/cmd",
                   "PostgreSQL CPU ms/cmd", "Redis CPU ms/cmd"):
        out.add_column(column, justify="right" if column != "what" else "left")
    base = report["baseline"]
    for label, runs in (("baseline", base), ("this worker", report["worker"])):
        for name, run in runs.items():
            reference = base.get(name, base["posts.create"])["per_second"]
            cpu = run["cpu_ms"]
            out.add_row(f"{label}: {name}", f"{run['per_second']:,.0f}",
                        f"{run['per_second'] / reference:.1f}x",
                        str(cpu.get("worker")), str(cpu.get("postgres")), str(cpu.get("redis")))
    ceiling = report["ceiling"]
    out.add_row("ceiling: PostgreSQL 1-row insert tx (4 clients)",
                f"{ceiling['pg_single_row_tx_per_s']:,.0f}", "", "", "", "")
    out.add_row("ceiling: PostgreSQL rows in 100-row inserts",
                f"{ceiling['pg_multi_row_rows_per_s']:,.0f}", "", "", "", "")
    out.add_row(f"ceiling: argon2id hashes ({ceiling['hashes_per_s_per_core']}/s/core x cores)",
                f"{ceiling['hash_ceiling_per_s']:,.0f}", "", "", "", "")
    out.add_row("ceiling: argon2id hashes, every core hashing at once",
                f"{ceiling['parallel_hash_ceiling_per_s']:,.0f}", "", "", "", "")
    latency_ = report["latency"]
    out.add_row(f"latency at {latency_['offered_per_s']:,.0f}/s: p50 {latency_['p50_ms']} ms, "
                f"p99 {latency_['p99_ms']} ms", "", "", "", "", "")
    soak = report["soak"]
    out.add_row(f"memory over {soak['commands']:,} commands: {soak['rss_start_mb']} -> "
                f"{soak['rss_end_mb']} MiB ({report['rss_growth_pct']}%)", "", "", "", "", "")
    out.add_row(f"users.create / hash ceiling: {report['users_create_ratio_vs_hash_ceiling']} "
                f"(per-core x cores), {report['users_create_ratio_vs_parallel_hash_ceiling']} "
                "(all cores at once)", "", "", "", "", "")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table, or one JSON object with --json."""
    parser = argparse.ArgumentParser(prog="python -m worker bench", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--commands", type=int, help="commands per throughput mix")
    parser.add_argument("--soak", type=int, help="commands in the memory soak")
    parser.add_argument("--database-url", help="a PostgreSQL server (default: throwaway)")
    parser.add_argument("--broker-url", help="a Redis (default: throwaway)")
    options = parser.parse_args(argv)
    sizes = QUICK if options.quick else FULL
    if options.commands:
        sizes = Sizes(**{**sizes.__dict__, "commands": options.commands})
    if options.soak:
        sizes = Sizes(**{**sizes.__dict__, "soak": options.soak})
    console = Console(stderr=True)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds the context managers: consumers and servers stop

    signal.signal(signal.SIGTERM, interrupted)
    with servers(options.database_url, options.broker_url) as stack, Progress(
            console=console, transient=True) as progress:
        report = measure(sizes, stack, progress)
    if options.json:
        print(json.dumps(report))
    else:
        Console().print(table(report))
    return 0
