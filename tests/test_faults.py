"""Fault injection: a load of commands, one fault each, then the oracle.

Each scenario runs on this module's own throwaway PostgreSQL and Redis (never the
machine's), publishes thousands of commands with unique command ids, injects one fault
mid-load, and checks: every command ended applied or dead-lettered exactly once, no effect
twice, nothing lost, and the queue and the unacknowledged set end empty. Each prints a
row of the table (scenario, sent, applied, dead-lettered, duplicates, lost).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
import redis
from alembic.config import Config
from sqlalchemy import create_engine, text

from alembic import command as alembic_command
from tests.conftest import ROOT, TEST_ENV, scalar, truncate_all
from worker.protocol import encode
from worker.servers import EmbeddedPostgres, EmbeddedRedis

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

LOAD = 3000
TABLE: list[str] = []
RUNNING: list[Consumer] = []


@dataclass
class Servers:
    """This module's private servers."""

    postgres: EmbeddedPostgres
    redis: EmbeddedRedis

    @property
    def database_url(self) -> str:
        return self.postgres.url

    @property
    def broker_url(self) -> str:
        return self.redis.url


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    base = tmp_path_factory.mktemp("faults")
    with EmbeddedPostgres(base / "pg") as postgres, EmbeddedRedis(base / "redis") as broker:
        config = Config(str(ROOT / "alembic.ini"))
        config.set_main_option("script_location", str(ROOT / "alembic"))
        config.attributes["database_url"] = postgres.url
        alembic_command.upgrade(config, "head")
        yield Servers(postgres, broker)
    print("\nscenario | sent | applied | dead-lettered | duplicates | lost")
    for row in TABLE:
        print(row)


@pytest.fixture
def stack(servers: Servers) -> Iterator[Servers]:
    truncate_all(servers.database_url)
    redis.Redis.from_url(servers.broker_url).flushdb()
    yield servers
    while RUNNING:
        consumer = RUNNING.pop()
        if consumer.process.poll() is None:
            consumer.kill()


class Consumer:
    """A worker node (`celery worker`, 2 pool processes) with a short visibility timeout."""

    def __init__(self, stack: Servers, *options: str, log: Path | None = None,
                 **env: str) -> None:
        command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                   "-c", "2", "--batch-size", "50", "--loglevel", "WARNING",
                   "--without-gossip", "--without-mingle", "-n", f"fault-{uuid.uuid4().hex[:6]}@%h",
                   *options]
        environment = {**os.environ, **TEST_ENV, "DATABASE_URL": stack.database_url,
                       "BROKER_URL": stack.broker_url, "BROKER_VISIBILITY_TIMEOUT": "6",
                       "RETRY_BACKOFF_MAX": "2", "MAX_RETRIES": "30", **env}
        output: Any = log.open("wb") if log is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(command, cwd=ROOT, env=environment,
                                        stdout=output, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        RUNNING.append(self)

    def children(self) -> list[psutil.Process]:
        """The pool processes, once they exist."""
        deadline = time.monotonic() + 30
        while not (found := psutil.Process(self.process.pid).children(recursive=True)):
            assert time.monotonic() < deadline, "no pool processes"
            time.sleep(0.1)
        return list(found)

    def kill(self) -> None:
        """SIGKILL the whole process group: no cleanup anywhere."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        """SIGTERM, as an orchestrator would; waits for the graceful exit."""
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()


def publish(stack: Servers, commands: list[tuple[str, dict[str, Any]]]) -> None:
    client = redis.Redis.from_url(stack.broker_url)
    for start in range(0, len(commands), 500):
        client.lpush("commands", *[encode(task, kwargs) for task, kwargs in
                                   commands[start:start + 500]])


def tags(prefix: str, count: int) -> list[tuple[str, dict[str, Any]]]:
    return [("tags.create", {"command_id": f"{prefix}-{i}", "data": {"name": f"{prefix}-{i}"}})
            for i in range(count)]


def progress(stack: Servers) -> int:
    return int(scalar(stack.database_url, "SELECT count(*) FROM command_ledger")
               + scalar(stack.database_url, "SELECT count(*) FROM dead_letters"))


def wait_for(stack: Servers, target: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while progress(stack) < target:
        assert time.monotonic() < deadline, f"{progress(stack)} of {target} ended in time"
        time.sleep(0.1)


def oracle(stack: Servers, scenario: str, keys: list[str], effects_table: str | None = "tags",
           timeout: float = 120) -> None:
    """Every key ended exactly once; nothing twice, nothing lost; Redis drained."""
    broker = redis.Redis.from_url(stack.broker_url)
    deadline = time.monotonic() + timeout
    engine = create_engine(stack.database_url)
    try:
        while True:
            with engine.connect() as connection:
                applied = {row[0] for row in connection.execute(
                    text("SELECT command_id FROM command_ledger"))}
                letters = [row[0] for row in connection.execute(
                    text("SELECT command_id FROM dead_letters"))]
                effects = connection.execute(text(
                    f"SELECT count(*) FROM {effects_table or 'tags'}")).scalar()
            ended = applied | set(letters)
            drained = (broker.llen("commands") == 0 and broker.hlen("commands.unacked") == 0
                       and broker.zcard("commands.unacked_index") == 0)
            if set(keys) <= ended and drained:
                break
            assert time.monotonic() < deadline, (
                f"{scenario}: {len(set(keys) - ended)} not ended, queue "
                f"{broker.llen('commands')}, unacked {broker.hlen('commands.unacked')}")
            time.sleep(0.2)
    finally:
        engine.dispose()
    wanted = set(keys)
    lost = len(wanted - ended)
    twice = len(letters) - len(set(letters)) + len(applied & set(letters))
    TABLE.append(f"{scenario} | {len(keys)} | {len(applied & wanted)} | "
                 f"{len(set(letters) & wanted)} | {twice} | {lost}")
    assert lost == 0
    assert twice == 0, f"{scenario}: {twice} commands ended twice"
    if effects_table is not None:
        # One row per applied create: an effect applied twice would show here.
        assert effects == len(applied & wanted), f"{scenario}: effects {effects}"


def test_sigkill_of_the_whole_worker_mid_load_loses_nothing(stack: Servers) -> None:
    load = tags("kill", LOAD)
    publish(stack, load)
    consumer = Consumer(stack)
    wait_for(stack, LOAD // 4)
    consumer.kill()
    Consumer(stack)  # a new worker recovers the dead one's unacknowledged batch
    oracle(stack, "SIGKILL whole worker", [k["command_id"] for _, k in load])


def test_sigkill_of_one_child_mid_load(stack: Servers) -> None:
    load = tags("child", LOAD)
    publish(stack, load)
    consumer = Consumer(stack)
    wait_for(stack, LOAD // 4)
    consumer.children()[0].kill()  # the supervisor starts another
    oracle(stack, "SIGKILL one child", [k["command_id"] for _, k in load])
    consumer.stop()


def test_sigterm_mid_load_finishes_or_returns_the_work(stack: Servers) -> None:
    load = tags("term", LOAD)
    publish(stack, load)
    consumer = Consumer(stack)
    wait_for(stack, LOAD // 4)
    consumer.stop()
    assert consumer.process.returncode == 0
    assert redis.Redis.from_url(stack.broker_url).hlen("commands.unacked") == 0
    restarted = Consumer(stack)
    oracle(stack, "SIGTERM, restart", [k["command_id"] for _, k in load])
    restarted.stop()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_postgresql_restart_mid_load(stack: Servers, mode: str) -> None:
    load = tags(f"pg-{mode}", LOAD)
    publish(stack, load)
    consumer = Consumer(stack)
    wait_for(stack, LOAD // 4)
    stack.postgres.restart(mode)
    oracle(stack, f"PostgreSQL restart ({mode})", [k["command_id"] for _, k in load])
    consumer.stop()


def test_a_redis_restart_mid_load_and_consuming_goes_on(stack: Servers) -> None:
    load = tags("redis", LOAD)
    publish(stack, load)
    consumer = Consumer(stack)
    wait_for(stack, LOAD // 4)
    stack.redis.restart()  # graceful: the append-only file keeps the queue
    later = tags("after-redis", 300)
    deadline = time.monotonic() + 30
    while True:
        try:
            publish(stack, later)
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    oracle(stack, "Redis restart (AOF)", [k["command_id"] for _, k in load + later])
    consumer.stop()


def test_redis_paused_longer_than_the_socket_timeout(stack: Servers) -> None:
    load = tags("pause", LOAD)
    publish(stack, load)
    consumer = Consumer(stack)
    wait_for(stack, LOAD // 4)
    stack.redis.pause()
    time.sleep(17)  # socket timeouts are 15 s
    stack.redis.resume()
    later = tags("after-pause", 300)
    publish(stack, later)
    oracle(stack, "Redis SIGSTOP 17 s", [k["command_id"] for _, k in load + later])
    consumer.stop()


def test_the_pool_exhausted(stack: Servers) -> None:
    load = tags("pool", 1000)
    publish(stack, load)
    consumer = Consumer(stack, DB_POOL_SIZE="1", DB_MAX_OVERFLOW="0",
                        DB_POOL_TIMEOUT="1")
    oracle(stack, "pool of 1, timeout 1 s", [k["command_id"] for _, k in load])
    consumer.stop()


def test_concurrent_updates_of_one_row_each_apply_once(stack: Servers) -> None:
    publish(stack, [("tags.create", {"command_id": "row", "data": {"name": "row"}})])
    consumers = [Consumer(stack), Consumer(stack)]
    wait_for(stack, 1)
    updates = [("tags.update", {"command_id": f"upd-{i}", "id": 1, "data": {"name": f"r{i}"}})
               for i in range(400)]
    publish(stack, updates)
    oracle(stack, "400 updates of one row, 2 workers",
           ["row"] + [k["command_id"] for _, k in updates], effects_table=None)
    assert scalar(stack.database_url, "SELECT version FROM tags") == 401
    for consumer in consumers:
        consumer.stop()


def test_one_command_id_100_times_at_once_on_two_independent_workers(stack: Servers) -> None:
    consumers = [Consumer(stack), Consumer(stack)]
    time.sleep(3)
    copies = [("tags.create", {"command_id": "once", "data": {"name": "once"}})] * 100
    task_ids = [str(uuid.uuid4()) for _ in copies]
    client = redis.Redis.from_url(stack.broker_url)
    barrier = threading.Barrier(4)

    def send(part: range) -> None:
        barrier.wait()
        client.lpush("commands", *[encode(copies[i][0], copies[i][1], task_id=task_ids[i])
                                   for i in part])

    threads = [threading.Thread(target=send, args=(range(i, 100, 4),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    oracle(stack, "one command id x100, 2 workers", ["once"])
    outcomes = []
    deadline = time.monotonic() + 60
    for task_id in task_ids:
        while not client.exists(f"celery-task-meta-{task_id}"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        outcomes.append(client.get(f"celery-task-meta-{task_id}"))
    kinds = [json.loads(raw)["result"]["outcome"] for raw in outcomes if raw]
    assert (kinds.count("applied"), kinds.count("duplicate")) == (1, 99)
    assert scalar(stack.database_url, "SELECT count(*) FROM tags") == 1
    for consumer in consumers:
        consumer.stop()


def test_an_update_before_its_create_is_not_found_and_nothing_else_is_lost(
    stack: Servers,
) -> None:
    early = [("users.update", {"command_id": "early", "id": 1, "data": {"is_active": False}})]
    load = early + tags("order", 500)
    publish(stack, load)
    consumer = Consumer(stack)
    oracle(stack, "update before create", [k["command_id"] for _, k in load])
    assert scalar(stack.database_url,
                  "SELECT reason FROM dead_letters WHERE command_id = 'early'") == "not_found"
    consumer.stop()


class Killer:
    """SIGKILLs the pool process that is applying the marked command, each time it is.

    A trigger on `tags` holds the insert of the tag named MARKED in `pg_sleep`; this watcher
    finds that backend in `pg_stat_activity`, maps its client port to the worker's process
    holding that connection (psutil), and kills that process: nothing in the product knows.
    """

    MARKED = "the-killer"

    def __init__(self, stack: Servers) -> None:
        self.url = stack.database_url
        self.consumer: Consumer | None = None
        self.killed: list[int] = []
        self.stopping = threading.Event()
        engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text(
                "CREATE FUNCTION hold_marked_tag() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN IF NEW.name = '{self.MARKED}' THEN PERFORM pg_sleep(60); END IF; "
                "RETURN NEW; END $$"))
            connection.execute(text(
                "CREATE TRIGGER hold_marked_tag BEFORE INSERT ON tags "
                "FOR EACH ROW EXECUTE FUNCTION hold_marked_tag()"))
            # A backend whose client died notices it within 100 ms, even asleep, and rolls
            # back, as it would on its next read: the killed batch's rows do not linger.
            connection.execute(text(
                "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET "
                "client_connection_check_interval = ''100ms''', current_database()); END $$"))
        engine.dispose()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def start(self, consumer: Consumer) -> None:
        """Watch `consumer`'s processes."""
        self.consumer = consumer
        self.thread.start()

    def _watch(self) -> None:
        engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
        seen: set[int] = set()
        try:
            while not self.stopping.is_set():
                with engine.connect() as connection:
                    held = connection.execute(text(
                        "SELECT pid, client_port FROM pg_stat_activity "
                        "WHERE wait_event = 'PgSleep' AND pid <> pg_backend_pid()")).all()
                for backend, port in held:
                    if backend in seen:
                        continue
                    process = self._holder(port)
                    if process is not None:
                        seen.add(backend)
                        process.kill()
                        self.killed.append(process.pid)
                time.sleep(0.02)
        finally:
            engine.dispose()

    def _holder(self, port: int) -> psutil.Process | None:
        """The worker's process whose end of a connection has local port `port`."""
        assert self.consumer is not None
        for process in psutil.Process(self.consumer.process.pid).children(recursive=True):
            try:
                if any(connection.laddr and connection.laddr.port == port
                       for connection in process.net_connections(kind="tcp")):
                    return process
            except psutil.NoSuchProcess:
                continue
        return None

    def remove(self) -> None:
        self.stopping.set()
        self.thread.join(10)
        engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text("DROP TRIGGER IF EXISTS hold_marked_tag ON tags"))
            connection.execute(text("DROP FUNCTION IF EXISTS hold_marked_tag()"))
            connection.execute(text(
                "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I RESET "
                "client_connection_check_interval', current_database()); END $$"))
            connection.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE wait_event = 'PgSleep'"))
        engine.dispose()


def test_a_command_that_kills_its_process_takes_no_batch_mate_with_it(
    stack: Servers, tmp_path: Path
) -> None:
    """A full batch of 100 with one killer: the 99 others are applied once each, the killer
    ends as one retries_exhausted dead letter after MAX_DELIVERIES deliveries (each killed),
    nothing is left in Redis, and the node goes on consuming."""
    load = tags("batch", 99)
    load.insert(50, ("tags.create", {"command_id": "killer", "data": {"name": Killer.MARKED}}))
    publish(stack, load)  # before the node starts: its first take is the whole batch
    killer = Killer(stack)  # the trigger is in place before any process connects
    log = tmp_path / "worker.log"
    try:
        consumer = Consumer(stack, "-c", "1", "--batch-size", "100", log=log,
                            MAX_DELIVERIES="5")
        node = psutil.Process(consumer.process.pid)
        killer.start(consumer)
        oracle(stack, "a killer in a batch of 100", [k["command_id"] for _, k in load])
        assert scalar(stack.database_url, "SELECT reason FROM dead_letters "
                                          "WHERE command_id = 'killer'") == "retries_exhausted"
        assert scalar(stack.database_url, "SELECT count(*) FROM dead_letters") == 1
        assert scalar(stack.database_url, "SELECT count(*) FROM command_ledger") == 99
        assert scalar(stack.database_url, f"SELECT count(*) FROM tags "
                                          f"WHERE name = '{Killer.MARKED}'") == 0
        # Killed at each of its MAX_DELIVERIES deliveries, never at the one after.
        assert len(killer.killed) == 5, killer.killed
        assert node.pid not in killer.killed
        lost = [line for line in log.read_text(errors="replace").splitlines()
                if "pool process was lost while applying" in line]
        assert "<batch of 100 from 'commands'>" in lost[0], lost
        assert all("<batch of 1 from 'commands'>" in line for line in lost[1:]), lost
        broker = redis.Redis.from_url(stack.broker_url)
        for key in ("commands.unacked", "commands.delayed", "commands.delayed.items"):
            assert not broker.exists(key), key
        # The node that lost five processes goes on.
        after = tags("after-killer", 10)
        publish(stack, after)
        oracle(stack, "after the killer", [k["command_id"] for _, k in after],
               effects_table=None)
        assert scalar(stack.database_url, "SELECT count(*) FROM tags") == 99 + 10
        assert node.is_running() and consumer.process.poll() is None
    finally:
        killer.remove()
    consumer.stop()
