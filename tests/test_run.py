"""`python -m worker run` on the embedded default: private servers, a stop, a restart."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import psycopg2  # type: ignore[import-untyped]
import pytest
import redis
from sqlalchemy.engine import make_url

from worker.servers import free_port

pytestmark = pytest.mark.integration


def start(cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = (cwd / "run.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "worker", "run", "--concurrency", "1"],
                               cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    record = cwd / ".data" / "servers.json"
    while not record.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError((cwd / "run.log").read_text())
        time.sleep(0.2)
    return process


def worker_cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def stop(process: subprocess.Popen[bytes], how: int) -> int:
    process.send_signal(how)
    return process.wait(90)


def exported(shell_lines: str) -> dict[str, str]:
    """The variables `export NAME=value` lines set, as a shell reads them."""
    done = subprocess.run(["bash", "-c", f"{shell_lines}\nenv -0"], capture_output=True,
                          check=True, env={}, timeout=30)
    pairs = (item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
    return {name: value for name, value in pairs
            if name in ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND", "COMMANDS_QUEUE")}


def hold_connections(urls: dict[str, str]) -> list[Any]:
    """A connection to each server, left open: stopping, the server closes it itself, so its
    own port keeps the connection in TIME_WAIT (what a restart used to trip on)."""
    url = make_url(urls["DATABASE_URL"])
    database = psycopg2.connect(host=url.host, port=url.port, user=url.username,
                                dbname=url.database, connect_timeout=10)
    broker = redis.Redis.from_url(urls["BROKER_URL"])
    broker.ping()
    return [database, broker]


def banner_lines(log: str) -> list[str]:
    """The shell lines the banner offers for another shell."""
    after = log[log.rindex("From another shell:"):].splitlines()[1:]
    return [line.strip() for line in itertools.takewhile(lambda line: line.startswith("  "),
                                                         after)]


def test_run_starts_private_servers_stops_cleanly_and_keeps_the_data(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND")}
    process = start(tmp_path, env)
    held: list[Any] = []
    try:
        record = json.loads((tmp_path / ".data" / "servers.json").read_text())
        sent = worker_cli(tmp_path, env, "send", "tags.create", "--data", '{"name": "kept"}',
                          "--wait", "--json", "--timeout", "60")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert json.loads(sent.stdout)["outcome"] == "applied"
        assert worker_cli(tmp_path, env, "check").returncode == 0
        children = psutil.Process(process.pid).children(recursive=True)
        second = worker_cli(tmp_path, env, "run")
        assert second.returncode == 3 and "already running" in second.stderr, second.stderr
        urls = exported(worker_cli(tmp_path, env, "env").stdout)
        assert (urls["DATABASE_URL"], urls["BROKER_URL"]) == (record["database_url"],
                                                              record["broker_url"])
        held = hold_connections(urls)
    finally:
        code = stop(process, signal.SIGINT)
        for connection in held:
            connection.close()
    log = (tmp_path / "run.log").read_text()
    assert code == 0, log
    # Stopped in the reverse order of the start: the worker, then Redis, then PostgreSQL.
    assert (log.index("Stopping the worker") < log.index("Stopping Redis then PostgreSQL")
            < log.index("Stopped.")), log
    assert "unreachable" not in log, log
    assert "Data " in log and "python -m worker send" in log  # where things are, what next
    assert not (tmp_path / ".data" / "servers.json").exists()
    servers = [p for p in psutil.process_iter(["cmdline"])
               if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert servers == [], "a server outlived run"
    assert len(children) >= 2 and not any(child.is_running() for child in children)
    assert record["database_url"].startswith("postgresql")

    # Without `run`, the other commands say clearly that no server is running.
    absent = worker_cli(tmp_path, env, "tags", "list")
    assert absent.returncode == 3 and "no `python -m worker run` is running" in absent.stderr

    # Again at once, from a shell that evaluated `env` (its URLs name these same servers),
    # with Flower: the same ports, the same data, and Flower's password only in environments.
    port = free_port()
    process = start(tmp_path, {**env, **urls, "FLOWER_BASIC_AUTH": f"op:{FLOWER_PASSWORD}",
                               "FLOWER_PORT": str(port)})
    try:
        again = json.loads((tmp_path / ".data" / "servers.json").read_text())
        assert (again["database_url"], again["broker_url"]) == (record["database_url"],
                                                                record["broker_url"])
        listed = worker_cli(tmp_path, env, "tags", "list", "--json")
        assert [json.loads(line)["name"] for line in listed.stdout.splitlines()] == ["kept"]
        assert flower_status(port, None) == 401
        assert flower_status(port, f"op:{FLOWER_PASSWORD}") == 200
        command_lines = [" ".join(p.info["cmdline"] or [])
                         for p in psutil.process_iter(["cmdline"])]
        assert not any(FLOWER_PASSWORD in line for line in command_lines)
        log = wait_for_banner(tmp_path)
        assert f"Flower      http://127.0.0.1:{port} (basic auth)" in log
        # The banner's lines work as they are in a new shell: no environment, elsewhere.
        shell = subprocess.run(["bash", "-ec", "\n".join(banner_lines(log))], cwd="/",
                               env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                               capture_output=True, text=True, timeout=120, check=False)
        assert shell.returncode == 0, shell.stdout + shell.stderr
        assert "applied" in shell.stdout and '"name": "hello"' in shell.stdout, shell.stdout
    finally:
        assert stop(process, signal.SIGTERM) == 0
    log = (tmp_path / "run.log").read_text()
    assert (log.index("Stopping Flower", log.rindex("From another shell"))
            < log.rindex("Stopping the worker") < log.rindex("Stopping Redis")), log


def wait_for_banner(cwd: Path, timeout: float = 120) -> str:
    """The run's output once its banner (printed when everything is up) is complete."""
    deadline = time.monotonic() + timeout
    while True:
        log = (cwd / "run.log").read_text()
        if log.count("Ctrl-C stops everything.") > log.count("Stopped."):
            return log
        assert time.monotonic() < deadline, log
        time.sleep(0.2)


def test_a_failing_flower_stops_everything_in_reverse_order_and_says_why(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND")}
    # A mistake Flower itself refuses, at start: an option that is not a number.
    env.update(FLOWER_BASIC_AUTH=f"op:{FLOWER_PASSWORD}", FLOWER_PORT=str(free_port()),
               FLOWER_PURGE_OFFLINE_WORKERS="soon")

    done = worker_cli(tmp_path, env, "run", "--concurrency", "1")

    said = done.stdout + done.stderr
    assert done.returncode == 3, said
    assert done.stderr.splitlines()[-1] == (
        "error: Flower exited with status 1: ValueError: invalid literal for int() with base "
        f"10: 'soon' (all it printed: {tmp_path / '.data' / 'flower.log'})"), said
    assert "command-worker is running" not in said and "http://" not in said  # no banner
    assert said.index("Stopping the worker") < said.index("Stopping Redis then PostgreSQL")
    assert "unreachable" not in said, said  # the worker stopped before the broker did
    assert [p for p in psutil.process_iter(["cmdline"])
            if str(tmp_path) in " ".join(p.info["cmdline"] or [])] == []


def test_a_taken_flower_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = worker_cli(tmp_path, {**env, "FLOWER_BASIC_AUTH": "op:pass-1234",
                                     "FLOWER_PORT": str(port)}, "run")

    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stderr == (f"error: Flower's address 127.0.0.1:{port} is taken (by another "
                           "`run`, or another program): set FLOWER_PORT to a free port\n")
    assert not (tmp_path / ".data").exists() and done.stdout == ""


FLOWER_PASSWORD = "flower-run-pass-7"


def flower_status(port: int, auth: str | None, timeout: float = 30) -> int:
    """The HTTP status of Flower's front page, once Flower answers (bounded wait)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/")
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_run_refuses_a_database_behind_the_code_without_migrate(
    servers: tuple[str, str], broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from tests.conftest import _fresh_database
    from worker.cli import app
    from worker.config import get_settings

    monkeypatch.setenv("DATABASE_URL", _fresh_database(servers[0]))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["run", "--no-migrate"])
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert result.exit_code == 3, result.output
    assert "python -m worker migrate" in result.output


def test_run_warns_about_a_redis_that_evicts_or_keeps_nothing(tmp_path: Path) -> None:
    import redis as redis_client

    from worker.runner import redis_warnings
    from worker.servers import EmbeddedRedis

    with EmbeddedRedis(tmp_path / "redis") as own:  # its own server: config is changed
        assert redis_warnings(own.url) == []
        client = redis_client.Redis.from_url(own.url)
        client.config_set("maxmemory-policy", "allkeys-lru")
        client.config_set("appendonly", "no")
        warnings = redis_warnings(own.url)
    assert any("evicts keys" in warning for warning in warnings)
    assert any("append-only" in warning or "nothing on disk" in warning
               for warning in warnings)
