"""`python -m worker run`: private servers when no URLs are set, migrations, consumer, Flower."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import redis
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from rich.console import Console
from rich.markup import escape
from sqlalchemy import create_engine, make_url

from alembic import command
from worker.config import Settings, running_servers_file
from worker.db import sync_url
from worker.errors import first_line
from worker.servers import EmbeddedPostgres, EmbeddedRedis, address_free, port_free

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
    engine = create_engine(sync_url(url), connect_args={"connect_timeout": 10},
                           hide_parameters=True)
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


def _remembered_ports(data_dir: Path) -> dict[str, int]:
    """The ports the private servers of `data_dir` had last time (empty before the first run)."""
    try:
        ports = json.loads((data_dir / "ports.json").read_text())
    except (OSError, ValueError):
        return {}
    return {name: port for name, port in ports.items() if isinstance(port, int)}


def _own_urls(settings: Settings) -> set[str]:
    """The URLs of this directory's private servers, as `env` prints them."""
    ports = _remembered_ports(Path(settings.data_dir).resolve())
    return {*(EmbeddedPostgres.url_on(ports[name]) for name in ("postgres",) if name in ports),
            *(EmbeddedRedis.url_on(ports[name]) for name in ("redis",) if name in ports)}


def own_servers_meant(settings: Settings) -> Settings:
    """`settings` with the URLs that name this directory's private servers unset.

    A shell that ran `eval "$(python -m worker env)"` has them exported; `run` started from it
    starts those servers again (on the same ports) rather than looking for them.
    """
    own = _own_urls(settings)
    meant = {name: None for name in ("database_url", "broker_url", "result_backend")
             if getattr(settings, name) in own}
    return settings.model_copy(update=meant) if meant else settings


def _start(stack: ExitStack, server: EmbeddedPostgres | EmbeddedRedis, remembered: int | None,
           console: Console) -> None:
    """Start `server` in `stack`, saying so when it cannot have its port of last time."""
    stack.enter_context(server)
    if remembered is not None and server.port != remembered:
        console.print(f"[yellow]note:[/] {server.name}'s port {remembered} of the last run is "
                      f"taken by another program: it listens on {server.port} this time")


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
    ports = _remembered_ports(data_dir)
    with ExitStack() as stack:
        try:
            database = settings.database_url
            if not database:
                console.print(f"Starting PostgreSQL under {data_dir / 'postgres'} ...")
                postgres = EmbeddedPostgres(data_dir / "postgres",
                                            _reusable(ports.get("postgres")))
                _start(stack, postgres, ports.get("postgres"), console)
                ports["postgres"] = postgres.port
                database = postgres.url
            broker = settings.broker_url
            if not broker:
                console.print(f"Starting Redis (append-only file) under {data_dir / 'redis'} "
                              "...")
                redis_server = EmbeddedRedis(data_dir / "redis", _reusable(ports.get("redis")),
                                             appendonly=True)
                _start(stack, redis_server, ports.get("redis"), console)
                ports["redis"] = redis_server.port
                broker = redis_server.url
        except (RuntimeError, TimeoutError, OSError) as error:
            raise RunError(f"could not start the embedded servers: {error} "
                           f"(their logs are under {data_dir})") from error
        _write_atomically(data_dir / "ports.json", json.dumps(ports))
        _write_atomically(record, json.dumps({"pid": os.getpid(), "database_url": database,
                                              "broker_url": broker}))
        stack.callback(record.unlink, missing_ok=True)
        started = [name for name, url in (("PostgreSQL", settings.database_url),
                                          ("Redis", settings.broker_url)) if not url]
        # Unwound first: said before the servers stop, after everything started later has.
        stack.callback(console.print, f"Stopping {' then '.join(reversed(started))} ...")
        yield Servers(database, broker, embedded=True)


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def worker_arguments(concurrency: int, batch_size: int, queue: str,
                     events: bool = True) -> list[str]:
    """The `celery worker` arguments of the node `run` and `consume` start."""
    return ["worker", "-Q", queue, "-c", str(concurrency), "--batch-size", str(batch_size),
            *(["-E"] if events else []), "--loglevel", "INFO"]


def worker_command(concurrency: int, batch_size: int, queue: str) -> list[str]:
    """The command line of the worker node `run` starts."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app",
            *worker_arguments(concurrency, batch_size, queue)]


def flower_command() -> list[str]:
    """Flower's command line (`python -m worker flower`): its password comes from the
    environment, never argv (`ps`), and it refuses to start without one."""
    return [sys.executable, "-m", "worker", "flower"]


def child_environment(settings: Settings, used: Servers) -> dict[str, str]:
    """The environment of the worker and Flower: the servers in use, the project importable."""
    env = {**os.environ, "DATABASE_URL": used.database_url, "BROKER_URL": used.broker_url}
    env.pop("RESULT_BACKEND", None)  # one naming this directory's Redis: the broker's, below
    if settings.result_backend:
        env["RESULT_BACKEND"] = settings.result_backend
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth  # Flower reads FLOWER_* options
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(ROOT), os.environ.get("PYTHONPATH", "")) if part)
    return env


class Child:
    """A process `run` starts and stops: the worker, or Flower.

    Its output goes to this terminal, or to `log` (Flower's request log would drown the
    worker's); either way, when it exits on its own, `failure()` says how and why.
    """

    def __init__(self, name: str, command: list[str], env: dict[str, str],
                 log: Path | None = None, stopping: str = "") -> None:
        """Start it in its own session: the terminal's Ctrl-C reaches `run`, which stops it."""
        self.name = name
        self.log = log
        self.stopping = stopping
        self.offset = 0
        if log is None:
            self.process = subprocess.Popen(command, env=env, start_new_session=True)
            return
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as output:
            self.offset = output.tell()
            self.process = subprocess.Popen(command, env=env, start_new_session=True,
                                            stdin=subprocess.DEVNULL, stdout=output,
                                            stderr=subprocess.STDOUT)

    def failure(self) -> str | None:
        """None while it runs; else how it ended, with its last words (the cause)."""
        code = self.process.poll()
        if code is None:
            return None
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0
               else f"exited with status {code}")
        if self.log is None:
            return f"{self.name} {how} (its output is above)"
        with self.log.open("rb") as output:
            output.seek(self.offset)
            said = output.read().decode("utf-8", errors="replace").strip().splitlines()
        cause = said[-1].strip() if said else "it printed nothing"
        return f"{self.name} {how}: {cause} (all it printed: {self.log})"

    def stop(self, console: Console, timeout: float = 60) -> None:
        """SIGTERM (Celery's warm shutdown: the commands in hand are finished), then SIGKILL
        after `timeout`; a worker killed so has its commands delivered again after the
        visibility timeout."""
        if self.process.poll() is None:
            console.print(f"Stopping {self.name}{self.stopping} ...")
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _wait_listening(child: Child, address: str, port: int, stopping: Callable[[], bool],
                    timeout: float = 60) -> None:
    """Wait until `child` accepts connections on address:port; RunError if it exits first."""
    deadline = time.monotonic() + timeout
    while not stopping():
        failure = child.failure()
        if failure is not None:
            raise RunError(failure)
        with suppress(OSError), socket.create_connection((address, port), timeout=1):
            return
        if time.monotonic() > deadline:
            raise RunError(f"{child.name} did not listen on {address}:{port} within "
                           f"{timeout:g} s (its output: {child.log})")
        time.sleep(0.2)


def _prepare_schema(url: str, apply_migrations: bool, console: Console) -> None:
    """Bring the schema to head (or refuse one behind it); RunError, in one line, if not."""
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    try:
        current, heads = schema_revisions(url)
        if current == heads:
            return
        if not apply_migrations:
            raise RunError(
                f"the database is at revision {sorted(current) or 'none'}, the code at "
                f"{sorted(heads)}: run `python -m worker migrate` (or `run --migrate`)")
        console.print("Applying migrations ...")
        migrate(url)
    except (SQLAlchemyError, CommandError) as error:
        raise RunError(f"cannot prepare the database {_safe(url)}: {first_line(error)}"
                       ) from None


def next_steps(settings: Settings) -> list[str]:
    """Shell lines that work from a new shell: this directory, this environment, a command."""
    here = Path.cwd()
    lines = [f"cd {shlex.quote(str(here))}"]
    prefix = Path(sys.prefix)
    if prefix != Path(sys.base_prefix):  # a virtual environment: activate it
        activate = prefix / "bin" / "activate"
        shown = activate.relative_to(here) if activate.is_relative_to(here) else activate
        lines.append(f"source {shlex.quote(str(shown))}")
        python = "python"
    else:
        python = shlex.quote(sys.executable)
    lines.append(f"{python} -m worker send tags.create --data '{{\"name\": \"hello\"}}' --wait")
    lines.append(f'eval "$({python} -m worker env)"   # the URLs, for any other client')
    return lines


def _banner(settings: Settings, used: Servers, concurrency: int,
            flower: str | None, console: Console) -> None:
    """Where everything is, and what to type next (no box: the lines copy as they are)."""
    rows = [("PostgreSQL", _safe(used.database_url)),
            ("Redis", f"{_safe(used.broker_url)}, queue {settings.commands_queue}")]
    if used.embedded:
        rows.append(("Data", str(Path(settings.data_dir).resolve())))
    rows.append(("Flower", f"{flower} (basic auth)" if flower
                 else "off (set FLOWER_BASIC_AUTH=user:password to start it)"))
    console.print(f"\n[bold]command-worker is running[/] ({concurrency} pool processes)",
                  highlight=False)
    for name, value in rows:
        console.print(f"  {name:<11} {escape(value)}", highlight=False, soft_wrap=True)
    console.print("\nFrom another shell:", highlight=False)
    for line in next_steps(settings):
        console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
    console.print("Ctrl-C stops everything.\n", highlight=False)


def run(settings: Settings, *, apply_migrations: bool, concurrency: int, batch_size: int,
        console: Console) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a clean stop.

    Everything started is stopped in the reverse order, whatever ends the run: Flower, the
    worker (finishing the commands in hand), Redis, PostgreSQL.
    """
    settings = own_servers_meant(settings)
    if settings.flower_basic_auth and not address_free(settings.flower_address,
                                                       settings.flower_port):
        raise RunError(f"Flower's address {settings.flower_address}:{settings.flower_port} is "
                       "taken (by another `run`, or another program): set FLOWER_PORT to a "
                       "free port")
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ExitStack() as stack:
            used = stack.enter_context(servers(settings, console))
            for problem in redis_warnings(used.broker_url):
                console.print(f"[yellow]warning:[/] {problem}")
            _prepare_schema(used.database_url, apply_migrations, console)
            env = child_environment(settings, used)
            # Children run in this directory, so they read the same `.env`.
            children = [Child("the worker", worker_command(
                concurrency, batch_size, settings.commands_queue), env,
                stopping=" (it finishes the commands in hand)")]
            stack.callback(children[0].stop, console)
            flower = None
            if settings.flower_basic_auth:
                children.append(Child("Flower", flower_command(), env,
                                      log=Path(settings.data_dir).resolve() / "flower.log"))
                stack.callback(children[-1].stop, console)
                _wait_listening(children[-1], settings.flower_address, settings.flower_port,
                                lambda: stopping)
                flower = f"http://{settings.flower_address}:{settings.flower_port}"
            if not stopping:
                _banner(settings, used, concurrency, flower, console)
            while not stopping:
                for child in children:
                    failure = child.failure()
                    if failure is not None:
                        raise RunError(failure)
                time.sleep(0.2)
        console.print("Stopped.")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
