"""Flower as operators run it (`python -m worker flower`) against a real worker node: every
page behind basic auth, the worker and broker pages full, commands listed without secrets,
its metrics scraped by a real Prometheus and its pages drawn by a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from tests.conftest import ROOT, WorkerProcess, wait_for
from worker.broker import QueueKeys

pytestmark = pytest.mark.integration

USER, PASSWORD = "operator", "flower-pass-123"
AUTH = f"{USER}:{PASSWORD}"
#: What every Chromium run here gets (Debian's chromium, headless, nothing fetched outside).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(url: str, auth: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            try:
                return response.status, json.loads(body or b"null")
            except ValueError:
                return response.status, body.decode()
    except urllib.error.HTTPError as error:
        return error.code, None


@pytest.fixture(scope="module")
def flower(database_url: str, broker_url: str, worker_process: WorkerProcess,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Flower started as `python -m worker flower` starts it (password in the environment)."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "BROKER_URL": broker_url,
           "FLOWER_BASIC_AUTH": AUTH, "FLOWER_ADDRESS": "127.0.0.1", "FLOWER_PORT": str(port)}
    log_path = tmp_path_factory.mktemp("flower") / "flower.log"
    command = [sys.executable, "-m", "worker", "flower"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def listening() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                get(base + "/healthcheck")
            except OSError:
                return False
            return True

        wait_for(listening, 60, "Flower never listened", interval=0.2)
        with open(f"/proc/{process.pid}/cmdline", "rb") as cmdline:
            assert PASSWORD.encode() not in cmdline.read()  # never on the command line
        yield base
    finally:
        process.terminate()
        process.wait(20)


def worker_entry(flower: str, name: str) -> dict[str, Any]:
    """The node's entry in /api/workers once Flower has every inspect reply for it."""
    def full() -> dict[str, Any] | None:
        status, workers = get(flower + "/api/workers?refresh=1", AUTH)
        assert status == 200
        entry = (workers or {}).get(name) or {}
        wanted = ("stats", "active_queues", "registered", "conf")
        return entry if all(entry.get(key) for key in wanted) else None

    found: dict[str, Any] = wait_for(full, 30, "Flower never had the whole worker",
                                     interval=0.2)
    return found


def test_every_flower_page_requires_basic_auth(flower: str) -> None:
    for page in ("/api/tasks", "/api/workers", "/workers", "/metrics", "/healthcheck"):
        assert get(flower + page)[0] == 401, page
        assert get(flower + page, f"{USER}:wrong")[0] == 401, page
        assert get(flower + page, AUTH)[0] == 200, page


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


def test_the_worker_page_and_api_workers_show_pool_queues_tasks_and_config(
    flower: str, worker_process: WorkerProcess
) -> None:
    entry = worker_entry(flower, worker_process.name)
    pool = entry["stats"]["pool"]
    assert pool["implementation"] == "celery.concurrency.prefork:TaskPool"
    assert pool["max-concurrency"] == 2 and len(pool["processes"]) == 2
    assert [queue["name"] for queue in entry["active_queues"]] == ["commands"]
    assert "tags.create" in entry["registered"] and len(entry["registered"]) == 9
    assert entry["conf"]["task_default_queue"] == "commands"
    assert entry["conf"]["accept_content"] == ["application/json"]
    status, page = get(f"{flower}/worker/{urllib.parse.quote(worker_process.name)}", AUTH)
    assert status == 200
    assert "Unknown worker" not in page
    for shown in (worker_process.name, "prefork:TaskPool", "commands", "tags.create",
                  "task_default_queue", str(pool["processes"][0])):
        assert shown in page, shown


def test_the_broker_page_and_queue_lengths_work(flower: str, broker_url: str) -> None:
    status, lengths = get(flower + "/api/queues/length", AUTH)
    assert status == 200, lengths
    queues = {queue["name"]: queue["messages"] for queue in lengths["active_queues"]}
    waiting = sum(redis.Redis.from_url(broker_url).llen(name)
                  for name in QueueKeys("commands").lists)
    assert queues == {"commands": waiting}
    status, page = get(flower + "/broker", AUTH)
    assert status == 200
    assert "not supported" not in page
    assert "commands" in page and "redis://" in page


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="needs the prometheus binary (Debian package 'prometheus')")
def test_prometheus_scrapes_celery_metrics_from_flower_behind_basic_auth(
    flower: str, producer: Celery, tmp_path: Path
) -> None:
    target = urllib.parse.urlsplit(flower).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "flower", "scrape_interval": "1s",
                            "basic_auth": {"username": USER, "password": PASSWORD},
                            "static_configs": [{"targets": [target]}]}]}))
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        sent = producer.send_task("tags.create", queue="commands",
                                  kwargs={"data": {"name": f"scraped-{time.time_ns()}"}})
        assert sent.get(timeout=30)["outcome"] == "applied"

        def query(expression: str) -> list[Any]:
            try:
                status, answer = get(f"http://127.0.0.1:{port}/api/v1/query?"
                                     + urllib.parse.urlencode({"query": expression}))
            except OSError:
                return []
            return list(answer["data"]["result"]) if status == 200 else []

        succeeded = wait_for(lambda: query(
            'flower_events_total{job="flower",task="tags.create",type="task-succeeded"}'),
            30, (tmp_path / "prometheus.log").read_text()[-2000:], interval=0.2)
        assert float(succeeded[0]["value"][1]) >= 1
        (up,) = query('up{job="flower"}')
        assert up["value"][1] == "1"  # the scrape passed Flower's basic auth
        assert query('flower_worker_online{job="flower"} == 1')
    finally:
        process.terminate()
        process.wait(20)


def chromium(*arguments: str, profile: Path) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with a fresh profile, as the checks here need it."""
    binary = shutil.which("chromium")
    assert binary is not None
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           *arguments], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs the chromium binary (Debian package 'chromium')")
def test_the_worker_page_in_headless_chromium_shows_the_node_its_pool_and_queues(
    flower: str, worker_process: WorkerProcess, tmp_path: Path
) -> None:
    worker_entry(flower, worker_process.name)  # Flower has the node's inspect replies
    address = urllib.parse.urlsplit(flower).netloc
    page = (f"http://{USER}:{PASSWORD}@{address}/worker/"
            f"{urllib.parse.quote(worker_process.name)}")
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", page, profile=tmp_path / "dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for shown in (worker_process.name, "prefork:TaskPool", "commands", "tags.create"):
        assert shown in dom.stdout, shown
    assert "Unknown worker" not in dom.stdout
    screenshot = tmp_path / "worker.png"
    shot = chromium("--window-size=1366,1000", "--virtual-time-budget=5000",
                    f"--screenshot={screenshot}", page, profile=tmp_path / "shot")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000  # a drawn page, not a blank one
    kept = os.environ.get("FLOWER_SCREENSHOT")  # where to keep it, for a person to look at
    if kept:
        shutil.copy(screenshot, kept)
