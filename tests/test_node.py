"""The worker node as `run`, `consume` and compose start it (gossip and mingle on): it keeps
going whatever a client broadcasts."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery import Celery

from tests.conftest import WORKER, WorkerProcess, start_worker, stop_worker
from worker.protocol import encode

pytestmark = pytest.mark.integration


@pytest.fixture
def node(database_url: str, broker_url: str, tmp_path: Path) -> Iterator[tuple[WorkerProcess,
                                                                               str]]:
    """A node with gossip and mingle, on a Redis database of its own."""
    isolated = urlunsplit(urlsplit(broker_url)._replace(path="/13"))
    redis.Redis.from_url(isolated).flushdb()
    flags = [flag for flag in WORKER if flag not in ("--without-gossip", "--without-mingle")]
    assert flags != WORKER
    worker = start_worker(database_url, isolated, tmp_path / "node.log", flags=flags)
    try:
        yield worker, isolated
    finally:
        stop_worker(worker)
        redis.Redis.from_url(isolated).flushdb()


def applied(broker: str, name: str, timeout: float = 30) -> bool:
    client = redis.Redis.from_url(broker)
    task_id = f"alive-{uuid.uuid4().hex}"
    client.lpush("commands", encode("tags.create", {"data": {"name": name}}, task_id=task_id))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stored = client.get(f"celery-task-meta-{task_id}")
        if stored is not None:
            return bool(json.loads(stored)["status"] == "SUCCESS")
        time.sleep(0.05)
    return False


def test_an_election_broadcast_does_not_stop_a_node_with_gossip(
    node: tuple[WorkerProcess, str], clean_database: str
) -> None:
    worker, broker = node
    client = Celery("operator", broker=broker)
    # Celery's own gossip fails on an election with one node ("IndexError" in the clock) and
    # on an election event with a field missing; either stopped the node before.
    client.control.election(f"election-{uuid.uuid4().hex}", "task", None)
    with client.connection_for_write() as connection:
        dispatcher = client.events.Dispatcher(connection, hostname="intruder@x")
        dispatcher.send("worker-elect", id="x")  # no topic, no action, no clock
        dispatcher.send("worker-elect-ack", id=None)
    time.sleep(2)
    assert worker.process.poll() is None, worker.log_text()[-2000:]
    assert applied(broker, f"after-election-{uuid.uuid4().hex[:8]}")
    assert "Unrecoverable error" not in worker.log_text()
    client.close()


def test_a_node_takes_on_after_redis_lost_its_scripts(
    node: tuple[WorkerProcess, str], clean_database: str
) -> None:
    # The take is sent by its SHA-1 behind the wait for the queue; a Redis that restarted or
    # flushed its scripts answers NOSCRIPT to it, and the node must load the script again
    # rather than stop taking (it once backed off on that answer, again and again).
    worker, broker = node
    client = redis.Redis.from_url(broker)
    assert applied(broker, f"before-flush-{uuid.uuid4().hex[:8]}")
    for _ in range(3):
        client.script_flush()
        time.sleep(0.3)  # a wait with the take behind it is now in Redis: it answers NOSCRIPT
        assert applied(broker, f"after-flush-{uuid.uuid4().hex[:8]}", timeout=5)
    assert worker.process.poll() is None
    assert "cannot take commands" not in worker.log_text()
