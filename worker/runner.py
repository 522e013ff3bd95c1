"""`python -m worker run`: private servers when no URLs are set, migrations, consumer, Flower."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import redis
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from rich.console import Console
from rich.panel import Panel
from sqlalchemy import create_engine, make_url

from alembic import command
from worker.config import Settings, running_servers_file
from worker.db import sync_url
from worker.servers import EmbeddedPostgres, EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent


class RunError(RuntimeError):
    """`run` cannot go on; the message says why and what to do."""


def alembic_config(url: str) -> Config:
    """Alembic's configuration for this project, aimed at `url`."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    config.attributes["database_url"] = sync_url(url)
    return config


def schema_revisions(url: str) -> tuple[set[str], set[str]]:
    """(the database's current revisions, the code's heads)."""
    heads = set(ScriptDirectory.from_config(alembic_config(url)).get_heads())
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    finally:
        engine.dispose()
    return current, heads


def migrate(url: str) -> None:
    """`alembic upgrade head` against `url`."""
    command.upgrade(alembic_config(url), "head")


def redis_warnings(url: str) -> list[str]:
    """What in the given Redis's configuration breaks the delivery guarantees."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    problems = []
    try:
        config = client.config_get("maxmemory-policy")
        config.update(client.config_get("appendonly"))
        config.update(client.config_get("save"))
    except redis.ResponseError:
        return ["cannot read the Redis configuration (CONFIG is disabled): check it yourself"]
    finally:
        client.close()
    if config.get("maxmemory-policy", "noeviction") != "noeviction":
        problems.append(f"Redis evicts keys (maxmemory-policy {config['maxmemory-policy']}): "
                        "commands can be lost; set maxmemory-policy noeviction")
    if config.get("appendonly") != "yes" and not config.get("save"):
        problems.append("Redis keeps nothing on disk (no AOF, no RDB): a restart loses every "
                        "queued command; set appendonly yes")
    elif config.get("appendonly") != "yes":
        problems.append("Redis has no append-only file: a crash loses the commands since the "
                        "last snapshot; set appendonly yes")
    return problems


@dataclass
class Servers:
    """The URLs in use and, when `run` started them, the private servers."""

    database_url: str
    broker_url: str
    embedded: bool


@contextmanager
def servers(settings: Settings, console: Console) -> Iterator[Servers]:
    """The configured servers, or private ones under DATA_DIR (same ports as last time)."""
    if settings.database_url and settings.broker_url:
        yield Servers(settings.database_url, settings.broker_url, embedded=False)
        return
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    ports_file = data_dir / "ports.json"
    ports = json.loads(ports_file.read_text()) if ports_file.exists() else {}
    with ExitStack() as stack:
        database = settings.database_url
        if not database:
            console.print(f"Starting PostgreSQL under {data_dir / 'postgres'} ...")
            postgres = EmbeddedPostgres(data_dir / "postgres", ports.get("postgres") or free_port())
            stack.enter_context(postgres)
            ports["postgres"] = postgres.port
            database = postgres.url
        broker = settings.broker_url
        if not broker:
            console.print(f"Starting Redis (append-only file) under {data_dir / 'redis'} ...")
            redis_server = EmbeddedRedis(data_dir / "redis", ports.get("redis") or free_port())
            stack.enter_context(redis_server)
            ports["redis"] = redis_server.port
            broker = redis_server.url
        ports_file.write_text(json.dumps(ports))
        record = Path(running_servers_file(settings)).resolve()
        record.write_text(json.dumps({"pid": os.getpid(), "database_url": database,
                                      "broker_url": broker}))
        stack.callback(record.unlink, missing_ok=True)
        yield Servers(database, broker, embedded=True)


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def consumer_command(kind: str, concurrency: int, batch_size: int, queue: str) -> list[str]:
    """The command line of the consumer `run` starts."""
    if kind == "celery":
        return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                "-Q", queue, "-c", str(concurrency), "-E", "--loglevel", "INFO"]
    return [sys.executable, "-m", "worker.batch", "--concurrency", str(concurrency),
            "--batch-size", str(batch_size)]


def run(settings: Settings, *, apply_migrations: bool, concurrency: int, batch_size: int,
        consumer: str, console: Console) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a clean stop."""
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        with servers(settings, console) as used:
            for problem in redis_warnings(used.broker_url):
                console.print(f"[yellow]warning:[/] {problem}")
            current, heads = schema_revisions(used.database_url)
            if current != heads:
                if not apply_migrations:
                    raise RunError(
                        f"the database is at revision {sorted(current) or 'none'}, the code at "
                        f"{sorted(heads)}: run `python -m worker migrate` (or `run --migrate`)")
                console.print("Applying migrations ...")
                migrate(used.database_url)
            env = {**os.environ, "DATABASE_URL": used.database_url,
                   "BROKER_URL": used.broker_url}
            children.append(("worker", subprocess.Popen(
                consumer_command(consumer, concurrency, batch_size, settings.commands_queue),
                cwd=ROOT, env=env, start_new_session=True)))
            flower = ""
            if settings.flower_basic_auth:
                flower = f"http://{settings.flower_address}:{settings.flower_port}"
                children.append(("flower", subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower",
                     f"--address={settings.flower_address}", f"--port={settings.flower_port}",
                     f"--basic-auth={settings.flower_basic_auth}"],
                    cwd=ROOT, env=env, start_new_session=True,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            console.print(Panel.fit(
                f"[bold]command-worker is running[/] ({consumer} consumer, {concurrency} "
                f"processes)\n"
                f"PostgreSQL: {_safe(used.database_url)}\nRedis:      {_safe(used.broker_url)}"
                f" (queue [bold]{settings.commands_queue}[/])\n"
                + (f"Data:       {Path(settings.data_dir).resolve()}\n" if used.embedded else "")
                + (f"Flower:     {flower} (basic auth)\n" if flower else
                   "Flower:     off (set FLOWER_BASIC_AUTH=user:password to start it)\n")
                + "\nSend a first command from another shell in this directory:\n"
                "  python -m worker send tags.create --data '{\"name\": \"hello\"}' --wait\n"
                "Ctrl-C stops everything.", title="run"))
            while not stopping:
                for name, child in children:
                    if child.poll() is not None:
                        raise RunError(f"the {name} exited with status {child.returncode}")
                time.sleep(0.2)
            console.print("Stopping: the worker finishes the commands in hand ...")
            _stop(children)
            console.print("Stopped.")
            return 0
    finally:
        _stop(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(children: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    for _, child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for _, child in children:
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
