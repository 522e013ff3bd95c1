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
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
import redis
from alembic.config import Config
from sqlalchemy import create_engine, text

from alembic import command as alembic_command
from tests.conftest import ROOT, TEST_ENV, truncate_all
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

    def __init__(self, stack: Servers, **env: str) -> None:
        command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                   "-c", "2", "--batch-size", "50", "--loglevel", "WARNING",
                   "--without-gossip", "--without-mingle", "-n", f"fault-{uuid.uuid4().hex[:6]}@%h"]
        environment = {**os.environ, **TEST_ENV, "DATABASE_URL": stack.database_url,
                       "BROKER_URL": stack.broker_url, "BROKER_VISIBILITY_TIMEOUT": "6",
                       "RETRY_BACKOFF_MAX": "2", "MAX_RETRIES": "30", **env}
        self.process = subprocess.Popen(command, cwd=ROOT, env=environment,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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


def scalar(url: str, sql: str) -> Any:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(sql)).scalar()
    finally:
        engine.dispose()


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
