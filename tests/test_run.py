"""`python -m worker run` on the embedded default: private servers, a stop, a restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

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


def test_run_starts_private_servers_stops_cleanly_and_keeps_the_data(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND")}
    process = start(tmp_path, env)
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
    finally:
        code = stop(process, signal.SIGINT)
    log = (tmp_path / "run.log").read_text()
    assert code == 0, log
    assert "Data:" in log and "python -m worker send" in log  # where things are, what next
    assert not (tmp_path / ".data" / "servers.json").exists()
    servers = [p for p in psutil.process_iter(["cmdline"])
               if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert servers == [], "a server outlived run"
    assert len(children) >= 2 and not any(child.is_running() for child in children)
    assert record["database_url"].startswith("postgresql")

    # Without `run`, the other commands say clearly that no server is running.
    absent = worker_cli(tmp_path, env, "tags", "list")
    assert absent.returncode == 3 and "no `python -m worker run` is running" in absent.stderr

    # Again, with Flower: the same data, and Flower's password only in its environment.
    port = free_port()
    process = start(tmp_path, {**env, "FLOWER_BASIC_AUTH": f"op:{FLOWER_PASSWORD}",
                               "FLOWER_PORT": str(port)})
    try:
        listed = worker_cli(tmp_path, env, "tags", "list", "--json")
        assert [json.loads(line)["name"] for line in listed.stdout.splitlines()] == ["kept"]
        assert flower_status(port, None) == 401
        assert flower_status(port, f"op:{FLOWER_PASSWORD}") == 200
        command_lines = [" ".join(p.info["cmdline"] or [])
                         for p in psutil.process_iter(["cmdline"])]
        assert not any(FLOWER_PASSWORD in line for line in command_lines)
    finally:
        assert stop(process, signal.SIGTERM) == 0


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
