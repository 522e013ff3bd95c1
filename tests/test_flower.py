"""Flower against a real worker: basic auth required, commands listed without secrets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.conftest import ROOT, WorkerProcess

pytestmark = pytest.mark.integration

AUTH = "operator:flower-pass-123"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(url: str, auth: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
            try:
                return response.status, json.loads(body or b"null")
            except ValueError:
                return response.status, body.decode()
    except urllib.error.HTTPError as error:
        return error.code, None


@pytest.fixture
def flower(database_url: str, broker_url: str, worker_process: WorkerProcess,
           tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "BROKER_URL": broker_url}
    log = (tmp_path / "flower.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower",
         "--address=127.0.0.1", f"--port={port}", f"--basic-auth={AUTH}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                get(base + "/healthcheck")
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "flower.log").read_text())
        yield base
    finally:
        process.terminate()
        process.wait(20)


def test_flower_requires_basic_auth(flower: str) -> None:
    assert get(flower + "/api/tasks")[0] == 401
    assert get(flower + "/api/tasks", "operator:wrong")[0] == 401
    assert get(flower + "/api/tasks", AUTH)[0] == 200


def test_flower_lists_a_command_without_its_password(
    flower: str, producer: Celery, clean_database: str
) -> None:
    secret = "flower-must-not-see-this"
    time.sleep(1)  # Flower subscribes to events after it starts listening
    sent = producer.send_task("users.create", queue="commands", kwargs={
        "data": {"username": "flower", "email": "flower@example.com", "password": secret}})
    sent.get(timeout=30)
    deadline = time.monotonic() + 30
    task: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        status, tasks = get(flower + "/api/tasks", AUTH)
        assert status == 200
        task = (tasks or {}).get(sent.id)
        if task and task.get("state") == "SUCCESS":
            break
        time.sleep(0.3)
    assert task is not None, "Flower never saw the command"
    assert task["name"] == "users.create"
    assert task["state"] == "SUCCESS"
    assert "flower@example.com" in str(task["kwargs"])
    assert secret not in json.dumps(task)
