"""Bad input of every kind ends as a dead letter, and the worker keeps consuming."""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text

from tests.conftest import WorkerProcess
from worker.broker import QueueKeys, stored
from worker.protocol import encode

KEYS = QueueKeys("commands")

pytestmark = pytest.mark.integration


class Marker:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def letters(url: str) -> list[Any]:
    engine = create_engine(url)
    with engine.connect() as connection:
        found = list(connection.execute(text(
            "SELECT command_id, task, reason, error, kwargs, raw_body, raw_size, raw_sha256 "
            "FROM dead_letters "
            "ORDER BY id")))
    engine.dispose()
    return found


def wait_for(url: str, count: int, timeout: float = 30) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = letters(url)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"expected {count} dead letters, have {letters(url)}")


def tag_applied(url: str, name: str, timeout: float = 30) -> None:
    engine = create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                if connection.execute(text("SELECT 1 FROM tags WHERE name = :n"),
                                      {"n": name}).first():
                    return
            time.sleep(0.05)
    finally:
        engine.dispose()
    raise AssertionError(f"tag {name} was not applied")


@pytest.fixture
def queue(broker_url: str, worker_process: WorkerProcess,
          clean_database: str) -> redis.Redis:
    return redis.Redis.from_url(broker_url)


def push_then_check_alive(queue: redis.Redis, database_url: str, raw: bytes) -> None:
    """Put `raw` on the queue, then a good command after it, which must still be applied."""
    queue.lpush("commands", raw)
    name = f"alive-{uuid.uuid4().hex[:8]}"
    queue.lpush("commands", encode("tags.create", {"data": {"name": name}}))
    tag_applied(database_url, name)


def test_garbage_on_the_queue_is_an_undecodable_dead_letter(
    queue: redis.Redis, clean_database: str
) -> None:
    raw = b'garbage {"password": "hunter22"'
    push_then_check_alive(queue, clean_database, raw)
    (letter,) = wait_for(clean_database, 1)
    assert letter.reason == "undecodable" and letter.command_id is None
    # Not JSON: no text is kept, only what identifies it.
    assert letter.raw_body is None
    assert (letter.raw_size, letter.raw_sha256) == (len(raw), hashlib.sha256(raw).hexdigest())


def test_a_json_value_that_is_no_envelope_is_undecodable(
    queue: redis.Redis, clean_database: str
) -> None:
    push_then_check_alive(queue, clean_database, b'{"headers": {}}')
    push_then_check_alive(queue, clean_database, b"[1, 2, 3]")
    assert [letter.reason for letter in wait_for(clean_database, 2)] == ["undecodable"] * 2


def test_a_pickle_is_never_unpickled(
    queue: redis.Redis, clean_database: str, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    message = json.loads(encode("tags.create", {"data": {"name": "x"}}))
    message["content-type"] = "application/x-python-serialize"
    message["content-encoding"] = "binary"
    payload = pickle.dumps(((), {"data": Marker(str(marker))}, {}))
    message["body"] = base64.b64encode(payload).decode()
    push_then_check_alive(queue, clean_database, json.dumps(message).encode())
    (letter,) = wait_for(clean_database, 1)
    assert letter.reason == "undecodable"
    assert "application/x-python-serialize" in letter.error
    assert not marker.exists()


def test_an_unknown_task_is_a_dead_letter_without_its_password(
    queue: redis.Redis, clean_database: str, worker_process: WorkerProcess
) -> None:
    secret = "unknown-task-secret-77"
    raw = encode("users.explode", {"data": {"password": secret}, "command_id": "boom-1"})
    push_then_check_alive(queue, clean_database, raw)
    (letter,) = wait_for(clean_database, 1)
    assert (letter.reason, letter.task, letter.command_id) == (
        "unknown_command", "users.explode", "boom-1")
    assert secret not in json.dumps(letter.kwargs) and secret not in letter.raw_body
    assert secret not in worker_process.log_text()


def test_a_message_over_the_size_limit_is_invalid_without_being_parsed(
    queue: redis.Redis, clean_database: str
) -> None:
    raw = encode("tags.create", {"data": {"name": "x" * 2_000_000}})
    push_then_check_alive(queue, clean_database, raw)
    (letter,) = wait_for(clean_database, 1)
    assert letter.reason == "invalid"
    assert "exceeds the limit" in letter.error
    assert letter.raw_body is None and letter.raw_size == len(raw)


def test_a_message_delivered_too_often_ends_as_retries_exhausted(
    queue: redis.Redis, clean_database: str
) -> None:
    raw = encode("tags.create", {"data": {"name": "poison"}, "command_id": "poison-1"})
    # As if five workers had died running it: the next delivery is the sixth.
    push_then_check_alive(queue, clean_database, stored(raw, 5))
    (letter,) = wait_for(clean_database, 1)
    assert (letter.reason, letter.command_id) == ("retries_exhausted", "poison-1")


@pytest.mark.parametrize("task_id", ["nul\x00id", "x" * 300])
def test_a_task_id_the_ledger_cannot_keep_is_invalid_without_a_command_id(
    queue: redis.Redis, clean_database: str, task_id: str
) -> None:
    raw = encode("tags.create", {"data": {"name": "no-key"}}, task_id=task_id)
    push_then_check_alive(queue, clean_database, raw)
    (letter,) = wait_for(clean_database, 1)
    assert letter.reason == "invalid"
    assert "idempotency key" in letter.error


def test_a_body_nested_too_deeply_is_undecodable_and_nothing_crashes(
    queue: redis.Redis, clean_database: str
) -> None:
    # Within the size limit, valid JSON, but deeper than any parser's stack.
    raw = json.loads(encode("tags.create", {"data": {"name": "deep"}}))
    raw["body"] = base64.b64encode(b"[" * 200_000 + b"]" * 200_000).decode()
    push_then_check_alive(queue, clean_database, json.dumps(raw).encode())
    (letter,) = wait_for(clean_database, 1)
    assert letter.reason == "undecodable"


def test_nothing_is_left_unacknowledged_after_the_work(
    queue: redis.Redis, clean_database: str
) -> None:
    push_then_check_alive(queue, clean_database, b"garbage")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (queue.hlen(KEYS.unacked)
                                           or queue.zcard(KEYS.unacked_index)):
        time.sleep(0.05)
    assert queue.hlen(KEYS.unacked) == 0 and queue.zcard(KEYS.unacked_index) == 0
    assert queue.llen("commands") == 0


def hostile_body(body: str, **header_changes: Any) -> bytes:
    """A well-formed envelope for tags.create whose body is `body` as written (utf-8)."""
    message = json.loads(encode("tags.create", {}))
    message["body"] = body
    message["properties"]["body_encoding"] = "utf-8"
    message["headers"].update(header_changes)
    return json.dumps(message).encode()


def test_values_postgres_cannot_store_still_end_in_one_dead_letter_each(
    queue: redis.Redis, clean_database: str, worker_process: WorkerProcess
) -> None:
    secret = "poison-loop-secret-31"
    bodies = [body.replace("SECRET", secret) for body in (
        '[[], {"data": {"name": NaN}, "password": "SECRET"}, {}]',
        '[[], {"data": {"name": 1e400}, "Password": "SECRET"}, {}]',
        '[[], {"data": {"\\ud800": "x", "name": "\\udfff"}, "x": {"pwd": "SECRET"}}, {}]',
        '[[], {"data": {"name": "nul\\u0000", "password_hash": "$argon2id$\\u0000"}}, {}]',
        '[["SECRET"], {"data": {"name": "positional"}}, {}]',
    )]
    for body in bodies:
        queue.lpush("commands", hostile_body(body))
    push_then_check_alive(queue, clean_database, hostile_body('[[], {"data": {"name": "ok"}}, {}]'))
    found = wait_for(clean_database, len(bodies))
    assert [letter.reason for letter in found] == ["invalid"] * len(bodies)
    assert all(secret not in json.dumps(letter.kwargs) for letter in found)
    assert secret not in worker_process.log_text()


def test_a_message_with_a_null_task_id_and_no_command_id_is_invalid_not_a_duplicate(
    queue: redis.Redis, clean_database: str
) -> None:
    queue.lpush("commands", hostile_body('[[], {"data": {"name": "first"}}, {}]', id=None))
    queue.lpush("commands", hostile_body('[[], {"data": {"name": "second"}}, {}]', id=None))
    push_then_check_alive(queue, clean_database, hostile_body('[[], {"data": {"name": "ok"}}, {}]'))
    found = wait_for(clean_database, 2)
    assert [letter.reason for letter in found] == ["invalid", "invalid"]
    assert all("idempotency key" in letter.error for letter in found)


def test_keyword_arguments_nested_700_deep_end_in_a_redacted_dead_letter(
    queue: redis.Redis, clean_database: str, worker_process: WorkerProcess
) -> None:
    secret = "deep-secret-41"
    deep = '{"k": ' * 700 + '"x"' + "}" * 700
    body = '[[], {"data": DEEP, "items": [{"password": "SECRET"}]}, {}]'
    queue.lpush("commands", hostile_body(body.replace("DEEP", deep).replace("SECRET", secret)))
    push_then_check_alive(queue, clean_database, hostile_body('[[], {"data": {"name": "ok"}}, {}]'))
    (letter,) = wait_for(clean_database, 1)
    assert letter.reason == "invalid"
    assert secret not in json.dumps(letter.kwargs)
    assert secret not in worker_process.log_text()
