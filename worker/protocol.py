"""Celery protocol 2 messages as kombu's Redis transport stores them: encode and decode."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from worker.security import printable, safe_repr

JSON = "application/json"


def encode(
    task: str,
    kwargs: dict[str, Any],
    *,
    queue: str = "commands",
    task_id: str | None = None,
    args: list[Any] | None = None,
) -> bytes:
    """A message as `send_task` would put it on the queue list (secrets left out of reprs)."""
    task_id = task_id or str(uuid.uuid4())
    body = json.dumps([args or [], kwargs, {"callbacks": None, "errbacks": None,
                                            "chain": None, "chord": None}])
    envelope = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": JSON,
        "headers": {
            "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": safe_repr(args or [], positional=True),
            "kwargsrepr": safe_repr(kwargs),
            "origin": "worker.protocol", "ignore_result": False,
        },
        "properties": {
            "correlation_id": task_id, "reply_to": None, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope).encode()


def loads(raw: bytes | str) -> Any:
    """JSON `raw` as the standard library reads it; orjson's parser first, for speed.

    orjson refuses some JSON that the standard library reads (NaN, integers beyond 64 bits,
    lone surrogates): those take the slow path, so what a message means never depends on it.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            return json.loads(raw)
        except RecursionError:
            # Nested deeper than the interpreter's stack: not a message, whatever it is.
            raise ValueError("JSON nested too deeply") from None


class UndecodableMessage(ValueError):
    """A queue item that is not a JSON Celery protocol-2 message."""


@dataclass(frozen=True)
class Message:
    """A decoded command message."""

    task_id: str | None  # None when the message has none, or not a string (never "None")
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    delivery_tag: str
    headers: dict[str, Any]


def decode(raw: bytes | str) -> Message:
    """The message in `raw`, or `UndecodableMessage` saying why it is not one (never unpickles)."""
    try:
        envelope = loads(raw)
        if not isinstance(envelope, dict):
            raise UndecodableMessage("the queue item is not a JSON object")
        content_type = envelope.get("content-type")
        if content_type != JSON:
            raise UndecodableMessage(f"content type {printable(content_type)!r} is not accepted")
        properties, headers = envelope["properties"], envelope["headers"]
        body = envelope["body"]
        if properties.get("body_encoding") == "base64":
            body = base64.b64decode(body, validate=True)
        payload = loads(body)
        if not (isinstance(payload, list) and len(payload) >= 2):
            raise UndecodableMessage("the body is not [args, kwargs, embed]")
        args, kwargs = payload[0], payload[1]
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise UndecodableMessage("args must be a list and kwargs an object")
        task_id = headers.get("id")
        return Message(
            task_id=task_id if isinstance(task_id, str) else None, task=str(headers["task"]),
            args=args, kwargs=kwargs,
            delivery_tag=str(properties["delivery_tag"]), headers=headers,
        )
    except UndecodableMessage:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise UndecodableMessage("not a Celery protocol-2 JSON message: "
                                 f"{printable(error)}") from None
