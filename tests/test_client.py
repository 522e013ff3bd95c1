"""The producer client: validates first, keeps secrets out of headers, waits for outcomes."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import pytest
import redis

from tests.conftest import ROOT, WorkerProcess
from worker import client
from worker.config import Settings
from worker.errors import Invalid
from worker.schemas import UserCreate, parse
from worker.servers import free_port

pytestmark = pytest.mark.integration


def test_an_invalid_command_is_refused_before_anything_is_published(broker_url: str) -> None:
    queue = "client-invalid"
    settings = Settings(broker_url=broker_url, commands_queue=queue)
    with pytest.raises(Invalid, match=r"data\.email"):
        client.send("users.create", data={"username": "a", "email": "nope",
                                          "password": "password-123"}, settings=settings)
    with pytest.raises(Invalid, match="no command named"):
        client.send("users.explode", data={}, settings=settings)
    assert redis.Redis.from_url(broker_url).llen(queue) == 0


def test_the_published_message_holds_the_password_only_in_its_body(broker_url: str) -> None:
    queue = "client-headers"  # no worker consumes it: the message stays to be read
    settings = Settings(broker_url=broker_url, commands_queue=queue)
    secret = "header-leak-check-123"
    data = parse(UserCreate, {"username": "h", "email": "h@example.com", "password": secret})
    outcome = client.send_users_create(data, command_id="hdr-1", settings=settings)
    assert outcome.outcome == "pending" and outcome.command_id == "hdr-1"
    (raw,) = redis.Redis.from_url(broker_url).lrange(queue, 0, -1)
    envelope = json.loads(raw)
    assert secret not in json.dumps(envelope["headers"])
    assert secret not in json.dumps(envelope["properties"])
    body = json.loads(base64.b64decode(envelope["body"]))
    assert body[1]["data"]["password"] == secret  # the worker needs it to hash it
    redis.Redis.from_url(broker_url).delete(queue)


def test_send_and_wait_gives_applied_then_duplicate(
    broker_url: str, worker_process: WorkerProcess, clean_database: str
) -> None:
    settings = Settings(broker_url=broker_url)
    first = client.send_tags_create({"name": "client-tag"}, command_id="client-1", wait=30,
                                    settings=settings)
    second = client.send_tags_create({"name": "client-tag"}, command_id="client-1", wait=30,
                                     settings=settings)
    assert (first.outcome, second.outcome) == ("applied", "duplicate")
    assert first.result is not None and second.result is not None
    assert second.result["id"] == first.result["id"]


def test_a_rejection_comes_back_with_its_reason(
    broker_url: str, worker_process: WorkerProcess, clean_database: str
) -> None:
    settings = Settings(broker_url=broker_url)
    outcome = client.send("tags.delete", id=424242, wait=30, settings=settings)
    assert outcome.outcome == "rejected"
    assert outcome.reason == "not_found"
    assert outcome.error is not None and outcome.error.startswith("not_found: ")


def test_the_client_needs_neither_the_worker_app_nor_the_database() -> None:
    probe = ("import sys, worker.client; "
             "print(sorted(m for m in ('worker.celery_app', 'psycopg2') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_an_unreachable_broker_is_reported_promptly() -> None:
    nothing_listens = free_port()
    settings = Settings(broker_url=f"redis://127.0.0.1:{nothing_listens}/0",
                        commands_queue="client-unreachable")
    started = time.monotonic()
    with pytest.raises(client.BrokerUnreachable, match="cannot publish"):
        client.send_tags_create({"name": "nowhere"}, settings=settings)
    assert time.monotonic() - started < 15
