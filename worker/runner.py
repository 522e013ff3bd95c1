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
from worker.servers import EmbeddedPostgres, EmbeddedRedis, port_free

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
    # A bounded connect: `check` must answer, not hang, when the host does not.
    engine = create_engine(sync_url(url), connect_args={"connect_timeout": 10})
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


def _reusable(port: int | None) -> int | None:
    """`port` if a server can listen on it again, else None (a new one is chosen)."""
    return port if port is not None and port_free(port) else None


def _running_pid(record: Path) -> int | None:
    """The pid of the `run` that wrote `record`, if that process is still alive."""
    try:
        pid = int(json.loads(record.read_text())["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one step, so that a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


@contextmanager
def servers(settings: Settings, console: Console) -> Iterator[Servers]:
    """The configured servers, or private ones under DATA_DIR (same ports as last time).

    While they run, DATA_DIR/servers.json tells the other commands (run from the same
    directory) where they are; it is removed when they stop.
    """
    if settings.database_url and settings.broker_url:
        yield Servers(settings.database_url, settings.broker_url, embedded=False)
        return
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    record = Path(running_servers_file(settings)).resolve()
    other = _running_pid(record)
    if other is not None and other != os.getpid():
        raise RunError(f"`python -m worker run` is already running in {data_dir} "
                       f"(pid {other}): stop it first, or use it")
    # Ports are remembered apart from servers.json, which exists only while `run` does.
    ports_file = data_dir / "ports.json"
    ports = json.loads(ports_file.read_text()) if ports_file.exists() else {}
    with ExitStack() as stack:
        try:
            database = settings.database_url
            if not database:
                console.print(f"Starting PostgreSQL under {data_dir / 'postgres'} ...")
                postgres = stack.enter_context(
                    EmbeddedPostgres(data_dir / "postgres", _reusable(ports.get("postgres"))))
                ports["postgres"] = postgres.port
                database = postgres.url
            broker = settings.broker_url
            if not broker:
                console.print(f"Starting Redis (append-only file) under {data_dir / 'redis'} "
                              "...")
                redis_server = stack.enter_context(
                    EmbeddedRedis(data_dir / "redis", _reusable(ports.get("redis")),
                                  appendonly=True))
                ports["redis"] = redis_server.port
                broker = redis_server.url
        except (RuntimeError, TimeoutError, OSError) as error:
            raise RunError(f"could not start the embedded servers: {error} "
                           f"(their logs are under {data_dir})") from error
        _write_atomically(ports_file, json.dumps(ports))
        _write_atomically(record, json.dumps({"pid": os.getpid(), "database_url": database,
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


def flower_command(settings: Settings) -> list[str]:
    """Flower's command line; its password comes from the environment, never argv (`ps`)."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower",
            f"--address={settings.flower_address}", f"--port={settings.flower_port}"]


def child_environment(settings: Settings, used: Servers) -> dict[str, str]:
    """The environment of the worker and Flower: the servers in use, the project importable."""
    env = {**os.environ, "DATABASE_URL": used.database_url, "BROKER_URL": used.broker_url}
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth  # Flower reads FLOWER_* options
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(ROOT), os.environ.get("PYTHONPATH", "")) if part)
    return env


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
            env = child_environment(settings, used)
            # Children run in this directory, so they read the same `.env`; their own
            # session keeps the terminal's Ctrl-C from reaching them before we stop them.
            children.append(("worker", subprocess.Popen(
                consumer_command(consumer, concurrency, batch_size, settings.commands_queue),
                env=env, start_new_session=True)))
            flower = ""
            if settings.flower_basic_auth:
                flower = f"http://{settings.flower_address}:{settings.flower_port}"
                children.append(("flower", subprocess.Popen(
                    flower_command(settings), env=env, start_new_session=True,
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
            if used.embedded:
                console.print("Stopping Redis and PostgreSQL ...")
        console.print("Stopped.")
        return 0
    finally:
        _stop(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(children: list[tuple[str, subprocess.Popen[bytes]]], timeout: float = 60) -> None:
    """Stop the children in order (the worker first, finishing what it holds), each gracefully.

    SIGTERM is Celery's warm shutdown; one that outlasts `timeout` is killed, and its
    unacknowledged commands are delivered again after the visibility timeout.
    """
    for _, child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
