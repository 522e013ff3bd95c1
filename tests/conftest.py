"""Real PostgreSQL and Redis for the suite: throwaway servers, migrated once per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from alembic.config import Config
from celery import Celery
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from alembic import command

ROOT = Path(__file__).resolve().parent.parent

# Cheap hashing for tests: the cost parameters are settings, the algorithm is the same.
TEST_ENV = {
    "PASSWORD_HASH_TIME_COST": "1",
    "PASSWORD_HASH_MEMORY_KIB": "1024",
    "PASSWORD_HASH_PARALLELISM": "1",
    "COMMANDS_QUEUE": "commands",
}
os.environ.update(TEST_ENV)
for _name in ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND"):
    os.environ.pop(_name, None)

pytest_plugins = ["worker.testing"]

TABLES = "users, posts, tags, post_tags, command_ledger, dead_letters"


def _reload_settings() -> None:
    from worker import db, security
    from worker.celery_app import app, configure
    from worker.config import get_settings

    get_settings.cache_clear()
    security.password_hasher.cache_clear()
    db.reset_engine()
    configure(app, get_settings())


def _fresh_database(server_url: str) -> str:
    """A new empty database on the server at `server_url`; its URL."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(PostgreSQL server URL, Redis URL): TEST_DATABASE_URL/TEST_BROKER_URL or throwaways."""
    given_db, given_broker = os.environ.get("TEST_DATABASE_URL"), os.environ.get("TEST_BROKER_URL")
    if given_db and given_broker:
        yield given_db, given_broker
        return
    from worker.servers import EmbeddedPostgres, EmbeddedRedis

    base = tmp_path_factory.mktemp("servers")
    with EmbeddedPostgres(base / "pg") as postgres, EmbeddedRedis(base / "redis") as redis_server:
        yield postgres.url, redis_server.url


@pytest.fixture(scope="session")
def database_url(servers: tuple[str, str]) -> str:
    """A fresh database migrated to head by Alembic; DATABASE_URL points at it."""
    url = _fresh_database(servers[0])
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    config.attributes["database_url"] = url
    command.upgrade(config, "head")
    os.environ["DATABASE_URL"] = url
    _reload_settings()
    return url


@pytest.fixture(scope="session")
def broker_url(servers: tuple[str, str]) -> str:
    """The Redis broker (and result backend); BROKER_URL points at it."""
    url = servers[1]
    redis.Redis.from_url(url).flushdb()
    os.environ["BROKER_URL"] = url
    _reload_settings()
    return url


@pytest.fixture
def db_session(database_url: str) -> Iterator[Session]:
    """A session inside an outer transaction that is rolled back after the test."""
    from worker.db import get_engine

    with get_engine().connect() as connection:
        outer = connection.begin()
        session = Session(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        try:
            yield session
        finally:
            session.close()
            outer.rollback()


def scalar(url: str, sql: str, **params: Any) -> Any:
    """The first column of the first row `sql` returns, read on a connection of its own."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(sql), params).scalar()
    finally:
        engine.dispose()


def truncate_all(url: str) -> None:
    """Empty every table (for tests whose writes are committed by another process)."""
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture
def clean_database(database_url: str) -> Iterator[str]:
    """Every table empty before the test, and again after it."""
    truncate_all(database_url)
    yield database_url
    truncate_all(database_url)


@pytest.fixture(scope="session")
def producer(broker_url: str) -> Celery:
    """A bare Celery client, as any producer would have: no import of this project."""
    client = Celery("producer", broker=broker_url, backend=broker_url)
    client.conf.update(task_serializer="json", result_serializer="json",
                       accept_content=["json"], result_accept_content=["json"])
    return client


class WorkerProcess:
    """A real `celery worker` subprocess and its log file."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path, name: str = "") -> None:
        self.process = process
        self.log = log
        self.name = name

    def log_text(self) -> str:
        """Everything the worker has logged so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")


WORKER = ["-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO",
          "-c", "2", "-E", "--without-gossip", "--without-mingle", "--batch-size", "50"]


def start_worker(database: str, broker: str, log: Path, *extra: str,
                 env: dict[str, str] | None = None, name: str | None = None,
                 flags: list[str] | None = None) -> WorkerProcess:
    """Start a worker node (`celery worker`) and wait until it applies a command."""
    environment = {**os.environ, **TEST_ENV, "DATABASE_URL": database, "BROKER_URL": broker,
                   **(env or {})}
    environment.pop("RESULT_BACKEND", None)
    handle = log.open("wb")
    name = name or f"test-{uuid.uuid4().hex[:8]}@%h"
    process = subprocess.Popen(
        [sys.executable, *(flags or WORKER), "-n", name, *extra],
        cwd=ROOT, env=environment, stdout=handle, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = WorkerProcess(process, log, name.replace("%h", socket.gethostname()))
    if not wait_until_consuming(worker, broker, environment["COMMANDS_QUEUE"]):
        process.kill()
        raise RuntimeError(f"the worker did not consume in 60 s:\n{log.read_text()}")
    return worker


def wait_for(condition: Any, timeout: float = 10, message: str = "",
             interval: float = 0.05) -> Any:
    """`condition()`'s first truthy value, looked at every `interval` until `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or "condition not met in time")
        time.sleep(interval)


def wait_until_consuming(worker: WorkerProcess, broker: str, queue: str,
                         timeout: float = 60) -> bool:
    """Whether the worker applies a probe command (a tag) and stores its outcome in time."""
    from worker.protocol import encode

    client = redis.Redis.from_url(broker)
    task_id = f"probe-{uuid.uuid4().hex}"
    client.lpush(queue, encode("tags.create", {"data": {"name": task_id}}, queue=queue,
                               task_id=task_id))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            raise RuntimeError(f"worker exited:\n{worker.log_text()}")
        if client.exists(f"celery-task-meta-{task_id}"):
            return True
        time.sleep(0.05)
    return False


def stop_worker(worker: WorkerProcess, timeout: float = 30) -> None:
    """SIGTERM (warm shutdown), then SIGKILL if it hangs."""
    worker.process.terminate()
    try:
        worker.process.wait(timeout)
    except subprocess.TimeoutExpired:
        worker.process.kill()
        worker.process.wait()


@pytest.fixture(scope="session")
def worker_process(database_url: str, broker_url: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A real worker node for the session."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    worker = start_worker(database_url, broker_url, log)
    yield worker
    stop_worker(worker)
