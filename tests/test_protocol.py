"""Decoding what real Celery producers send: canvases with options are accepted as they are."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery, chain, chord, group

from worker.protocol import UndecodableMessage, canvas_problem, decode, encode


@pytest.fixture
def published(broker_url: str) -> Iterator[tuple[Celery, str, redis.Redis]]:
    producer = Celery("producer", broker=broker_url, backend=broker_url)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    yield producer, f"canvas-{uuid.uuid4().hex[:8]}", redis.Redis.from_url(broker_url)
    producer.close()


def tag(producer: Celery, queue: str, name: str, **options: object) -> object:
    return producer.signature("tags.create", kwargs={"data": {"name": name}}, queue=queue,
                              immutable=True, **options)


def test_real_callbacks_chains_groups_and_chords_with_options_are_no_canvas_problem(
    published: tuple[Celery, str, redis.Redis],
) -> None:
    producer, queue, client = published
    options = {"countdown": 1.5, "priority": 3, "expires": 60, "time_limit": 10}
    for sent in (
        tag(producer, queue, "linked", link=tag(producer, queue, "next", **options),
            link_error=tag(producer, queue, "failed")).apply_async(),
        chain(tag(producer, queue, "a"), group(tag(producer, queue, "b"),
                                               tag(producer, queue, "c")),
              tag(producer, queue, "d", **options)).apply_async(),
        chord([tag(producer, queue, "h1"), tag(producer, queue, "h2")],
              tag(producer, queue, "body", **options)).apply_async()):
        sent.forget()  # nothing waits for these results
    try:
        raws = client.lrange(queue, 0, -1)
        assert len(raws) >= 4
        for raw in raws:
            message = decode(raw)
            assert canvas_problem(message.embed) is None, message.embed
    finally:
        client.delete(queue)


@pytest.mark.parametrize("options", [
    {"countdown": "x"}, {"priority": "high"}, {"eta": "tomorrow"}, {"expires": [1]},
    {"task_id": 5}, {"headers": "x"}, {"time_limit": float("nan")}, "not an object",
])
def test_a_callback_with_an_option_celery_cannot_publish_with_is_a_canvas_problem(
    options: object,
) -> None:
    embed = {"callbacks": [{"task": "tags.create", "args": [], "kwargs": {},
                            "options": options}]}
    assert canvas_problem(embed) == "the message's callbacks is not a list of signatures"


def test_a_canvas_nested_deeper_than_any_real_one_is_refused_without_recursing() -> None:
    signature: dict[str, object] = {"task": "tags.create"}
    for _ in range(5000):
        signature = {"task": "celery.chain", "kwargs": {"tasks": [signature]}}
    assert canvas_problem({"chain": [signature]}) == "the message's canvas is nested too deeply"


def test_no_canvas_is_no_problem_but_anything_else_is_still_looked_at() -> None:
    empty = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert canvas_problem(empty) is None
    assert canvas_problem({}) is None
    # A value that is not None goes through every check, under any key.
    assert canvas_problem({**empty, "chord": {}}) == "the message's chord is not a signature"
    deep: object = "x"
    for _ in range(100):
        deep = [deep]
    assert canvas_problem({**empty, "other": deep}) == "the message's canvas is nested too deeply"


def test_a_base64_body_is_read_whole_or_wrapped_and_anything_else_is_refused() -> None:
    raw = encode("tags.create", {"data": {"name": "wrapped"}}, queue="q", task_id="t-1")
    envelope = json.loads(raw)
    body = envelope["body"]
    for shown in (body, "\n".join(body[i:i + 76] for i in range(0, len(body), 76)),
                  " " + body + "\r\n"):
        message = decode(json.dumps({**envelope, "body": shown}).encode())
        assert message.kwargs == {"data": {"name": "wrapped"}}
    for bad in (body[:-1] + "!", body + "\x00", "é" + body):
        with pytest.raises(UndecodableMessage, match="the body is not valid base64"):
            decode(json.dumps({**envelope, "body": bad}).encode())
