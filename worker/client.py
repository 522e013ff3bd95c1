"""A typed producer client: validate a command, publish it, optionally wait for its outcome.

It needs only the broker (and result backend): no database, no worker code running.

Publish after your own transaction commits, or a rolled-back change can still emit its
command. With SQLAlchemy, for example::

    from sqlalchemy import event

    @event.listens_for(session, "after_commit")
    def _publish(session):
        for command in session.info.pop("commands", []):
            client.send(**command)

    session.info.setdefault("commands", []).append(
        {"task": "users.create", "data": {...}, "command_id": "signup-42"})
    session.commit()     # the command is published only now

Give each command a stable `command_id`: publishing it again (after a crash between
commit and publish) is then answered as a duplicate, never applied twice.
"""

from __future__ import annotations

import reprlib
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from celery import Celery
from pydantic import BaseModel, SecretStr

from worker.apply import SPECS
from worker.config import Settings, broker_url, get_settings, result_backend_url
from worker.errors import REJECTIONS, Invalid
from worker.schemas import PostCreate, TagCreate, UserCreate, UserUpdate, parse
from worker.security import redact

_repr = reprlib.Repr()
_repr.maxstring = 200
_repr.maxlevel = 4


@dataclass(frozen=True)
class Outcome:
    """How a command ended: applied, duplicate, rejected (with its reason) or pending."""

    task_id: str
    command_id: str
    outcome: str
    result: dict[str, Any] | None = None
    reason: str | None = None
    error: str | None = None


@lru_cache(maxsize=4)
def _producer(broker: str, backend: str) -> Celery:
    app = Celery("command-worker-client", broker=broker, backend=backend)
    app.conf.update(task_serializer="json", result_serializer="json",
                    accept_content=["application/json"],
                    result_accept_content=["application/json"],
                    broker_connection_retry_on_startup=True)
    return app


def _plain(model: BaseModel) -> dict[str, Any]:
    """The fields a payload model was given, secrets revealed (they travel to the worker)."""
    plain: dict[str, Any] = {}
    for name in model.model_fields_set:
        value = getattr(model, name)
        plain[name] = value.get_secret_value() if isinstance(value, SecretStr) else value
    return plain


def _kwargs(task: str, data: BaseModel | dict[str, Any] | None, id: int | None,
            command_id: str | None, expected_version: int | None) -> dict[str, Any]:
    """The command's keyword arguments, validated as the worker will (Invalid otherwise)."""
    spec = SPECS.get(task)
    if spec is None:
        raise Invalid(f"no command named {task!r}: one of {', '.join(sorted(SPECS))}")
    envelope, data_model = spec.envelope, spec.data_model
    kwargs: dict[str, Any] = {}
    if data_model is not None:
        if isinstance(data, BaseModel):
            data = _plain(data)
        parse(data_model, data, "data")
        kwargs["data"] = data
    elif data is not None:
        raise Invalid(f"{task} takes no data")
    if id is not None:
        kwargs["id"] = id
    if expected_version is not None:
        kwargs["expected_version"] = expected_version
    kwargs["command_id"] = command_id or str(uuid.uuid4())
    parse(envelope, kwargs)
    return kwargs


def send(
    task: str,
    *,
    data: BaseModel | dict[str, Any] | None = None,
    id: int | None = None,
    command_id: str | None = None,
    expected_version: int | None = None,
    wait: float | None = None,
    settings: Settings | None = None,
) -> Outcome:
    """Validate and publish a command; with `wait` (seconds), wait for its outcome."""
    settings = settings or get_settings()
    kwargs = _kwargs(task, data, id, command_id, expected_version)
    return publish(task, kwargs, wait=wait, settings=settings)


def publish(task: str, kwargs: dict[str, Any], *, wait: float | None = None,
            settings: Settings | None = None, task_id: str | None = None) -> Outcome:
    """Publish keyword arguments as they are (replay uses this); see `send`."""
    settings = settings or get_settings()
    producer = _producer(broker_url(settings), result_backend_url(settings))
    sent = producer.send_task(
        task, kwargs=kwargs, queue=settings.commands_queue, task_id=task_id,
        # Producers' reprs travel in the message headers: keep secrets out of them.
        argsrepr="()", kwargsrepr=_repr.repr(redact(kwargs)),
    )
    key = str(kwargs.get("command_id") or sent.id)
    if wait is None:
        return Outcome(str(sent.id), key, "pending")
    return wait_for(str(sent.id), key, wait, settings)


def wait_for(task_id: str, command_id: str, timeout: float,
             settings: Settings | None = None) -> Outcome:
    """The outcome stored for `task_id`, waiting up to `timeout` seconds."""
    settings = settings or get_settings()
    producer = _producer(broker_url(settings), result_backend_url(settings))
    deadline = time.monotonic() + timeout
    while True:
        meta = producer.backend.get_task_meta(task_id)
        status = meta.get("status")
        if status == "SUCCESS":
            result = dict(meta["result"])
            return Outcome(task_id, command_id, str(result.get("outcome")), result=result)
        if status == "FAILURE":
            error = _error_text(meta.get("result"))
            reason = error.split(":", 1)[0]
            return Outcome(task_id, command_id, "rejected",
                           reason=reason if reason in REJECTIONS else "error", error=error)
        if time.monotonic() >= deadline:
            return Outcome(task_id, command_id, "pending")
        time.sleep(0.05)


def _error_text(stored: Any) -> str:
    if isinstance(stored, BaseException):
        return str(stored.args[0]) if stored.args else type(stored).__name__
    if isinstance(stored, dict):
        message = stored.get("exc_message")
        if isinstance(message, list | tuple):
            return str(message[0]) if message else str(stored.get("exc_type"))
        return str(message)
    return str(stored)


def send_users_create(data: UserCreate | dict[str, Any], **options: Any) -> Outcome:
    """`users.create`."""
    return send("users.create", data=data, **options)


def send_users_update(id: int, data: UserUpdate | dict[str, Any], **options: Any) -> Outcome:
    """`users.update`."""
    return send("users.update", id=id, data=data, **options)


def send_posts_create(data: PostCreate | dict[str, Any], **options: Any) -> Outcome:
    """`posts.create`."""
    return send("posts.create", data=data, **options)


def send_tags_create(data: TagCreate | dict[str, Any], **options: Any) -> Outcome:
    """`tags.create`."""
    return send("tags.create", data=data, **options)
