"""A typed producer client: validate a command, publish it, optionally wait for its outcome.

It needs only the broker (and result backend): it never imports the worker's Celery app and
never connects to the database, so any service can use it.

Publish after your own transaction commits, or a rolled-back change can still emit its
command (and a command published before the commit can run before its data is visible).
With SQLAlchemy, queue the commands on the session and publish them from `after_commit`::

    from sqlalchemy import event
    from worker import client

    @event.listens_for(SessionLocal, "after_commit")       # a sessionmaker, or a Session
    def _publish(session):
        for command in session.info.pop("commands", []):
            client.send(**command)

    @event.listens_for(SessionLocal, "after_soft_rollback")
    def _forget(session, previous_transaction):
        if previous_transaction.parent is None:             # not a savepoint: all undone
            session.info.pop("commands", None)

    session.info.setdefault("commands", []).append(
        {"task": "users.create", "data": {...}, "command_id": "signup-42"})
    session.commit()     # the command is published only now

or, without events, call `client.send(...)` right after `session.commit()` returns.
Validate before committing (`client.command_kwargs(task, ...)` raises `Invalid`), so that a
bad command fails your transaction rather than surfacing after it.
Give each command a stable `command_id` (derived from your own row, say): publishing it
again (after a crash between commit and publish, or a `BrokerUnreachable`) is then
answered as a duplicate, never applied twice.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import redis
from celery import Celery
from celery.exceptions import BackendError
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import BaseModel, SecretStr

from worker.apply import SPECS
from worker.config import Settings, broker_url, get_settings, result_backend_url
from worker.errors import REJECTIONS, Invalid, WorkerError
from worker.schemas import (
    PostCreate,
    PostUpdate,
    TagCreate,
    TagUpdate,
    UserCreate,
    UserUpdate,
    parse,
)
from worker.security import printable, safe_repr

# Seconds before an unreachable broker or result store is reported instead of retried.
CONNECT_TIMEOUT = 5.0
POLL_INTERVAL = 0.05

OutcomeName = Literal["applied", "duplicate", "rejected", "pending"]
_UNREACHABLE = (KombuOperationalError, redis.RedisError, BackendError, OSError)


class BrokerUnreachable(WorkerError):
    """The broker (or result store) did not answer: nothing is known to be published."""


@dataclass(frozen=True)
class SendResult:
    """How a sent command ended: applied, duplicate, rejected (with its reason) or pending."""

    task_id: str
    command_id: str
    outcome: OutcomeName
    result: dict[str, Any] | None = None
    reason: str | None = None
    error: str | None = None


def _sentinel(master: str | None) -> dict[str, Any]:
    """The transport option naming the sentinel master, when BROKER_URL is sentinel://."""
    return {"master_name": master} if master else {}


@lru_cache(maxsize=4)
def _publisher(broker: str, queue: str, sentinel_master: str | None) -> Celery:
    """A bare Celery app for publishing only: no result backend.

    With a result backend, `send_task` subscribes to the result's pub/sub channel on every
    send; a producer that never waits would pile up subscriptions. Outcomes are read with
    `_results` instead.
    """
    app = Celery("command-worker-client", broker=broker)
    app.conf.update(
        task_serializer="json",
        accept_content=["application/json"],
        task_default_queue=queue,
        # Fail fast on a dead broker rather than hang the caller: it can resend (same key).
        broker_connection_timeout=CONNECT_TIMEOUT,
        broker_transport_options={"socket_connect_timeout": CONNECT_TIMEOUT,
                                  "socket_timeout": 2 * CONNECT_TIMEOUT,
                                  **_sentinel(sentinel_master)},
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2,
                                   "interval_step": 0.5, "interval_max": 1},
    )
    return app


@lru_cache(maxsize=4)
def _results(backend: str, sentinel_master: str | None) -> Celery:
    """A bare Celery app for reading stored outcomes (plain GETs, no pub/sub)."""
    app = Celery("command-worker-client-results", backend=backend)
    app.conf.update(
        result_serializer="json",
        result_accept_content=["application/json"],
        redis_socket_connect_timeout=CONNECT_TIMEOUT,
        redis_socket_timeout=2 * CONNECT_TIMEOUT,
        result_backend_transport_options={"retry_policy": {"timeout": CONNECT_TIMEOUT},
                                          **_sentinel(sentinel_master)},
    )
    return app


def _plain(model: BaseModel) -> dict[str, Any]:
    """The fields a payload model was given, secrets revealed (they travel to the worker)."""
    plain: dict[str, Any] = {}
    for name in model.model_fields_set:
        value = getattr(model, name)
        plain[name] = value.get_secret_value() if isinstance(value, SecretStr) else value
    return plain


def command_kwargs(task: str, *, data: BaseModel | dict[str, Any] | None = None,
                   id: int | None = None, command_id: str | None = None,
                   expected_version: int | None = None) -> dict[str, Any]:
    """The command's keyword arguments, validated as the worker will (`Invalid` otherwise)."""
    spec = SPECS.get(task)
    if spec is None:
        raise Invalid(f"no command named {printable(task)!r}: one of {', '.join(sorted(SPECS))}")
    kwargs: dict[str, Any] = {}
    if spec.data_model is not None:
        if isinstance(data, BaseModel):
            data = _plain(data)
        parse(spec.data_model, data, "data")
        kwargs["data"] = data
    elif data is not None:
        raise Invalid(f"{task} takes no data")
    if id is not None:
        kwargs["id"] = id
    if expected_version is not None:
        kwargs["expected_version"] = expected_version
    kwargs["command_id"] = command_id or str(uuid.uuid4())
    parse(spec.envelope, kwargs)
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
) -> SendResult:
    """Validate and publish a command; with `wait` (seconds), wait for its outcome.

    Raises `Invalid` (nothing published) or `BrokerUnreachable`. Without `command_id` a
    new one is made: pass your own to make a resend safe.
    """
    kwargs = command_kwargs(task, data=data, id=id, command_id=command_id,
                            expected_version=expected_version)
    return publish(task, kwargs, wait=wait, settings=settings)


def publish(task: str, kwargs: dict[str, Any], *, wait: float | None = None,
            settings: Settings | None = None) -> SendResult:
    """Publish keyword arguments as they are, unvalidated; see `send`."""
    settings = settings or get_settings()
    try:
        sent = _publisher(broker_url(settings), settings.commands_queue,
                          settings.broker_sentinel_master).send_task(
            task, kwargs=kwargs, queue=settings.commands_queue,
            # Producers' reprs travel in the message headers: keep secrets out of them.
            argsrepr="()", kwargsrepr=safe_repr(kwargs),
        )
    except _UNREACHABLE as error:
        raise BrokerUnreachable(f"cannot publish to the broker: {type(error).__name__}: "
                                f"{error}".splitlines()[0]) from None
    key = str(kwargs.get("command_id") or sent.id)
    if wait is None:
        return SendResult(str(sent.id), key, "pending")
    return wait_for(str(sent.id), key, wait, settings)


def wait_for(task_id: str, command_id: str, timeout: float,
             settings: Settings | None = None) -> SendResult:
    """The outcome stored for `task_id`, waiting up to `timeout` seconds (else pending)."""
    settings = settings or get_settings()
    backend = _results(result_backend_url(settings), settings.broker_sentinel_master).backend
    deadline = time.monotonic() + timeout
    while True:
        try:
            meta = backend.get_task_meta(task_id)
        except _UNREACHABLE as error:
            raise BrokerUnreachable(f"cannot read the outcome: {type(error).__name__}: "
                                    f"{error}".splitlines()[0]) from None
        status = meta.get("status")
        if status == "SUCCESS":
            result = dict(meta["result"])
            outcome = result.get("outcome")
            return SendResult(task_id, command_id,
                              "duplicate" if outcome == "duplicate" else "applied",
                              result=result)
        if status == "FAILURE":
            error_text = _error_text(meta.get("result"))
            reason = error_text.split(":", 1)[0]
            return SendResult(task_id, command_id, "rejected",
                              reason=reason if reason in REJECTIONS else "error",
                              error=error_text)
        if time.monotonic() >= deadline:
            return SendResult(task_id, command_id, "pending")
        time.sleep(POLL_INTERVAL)


def _error_text(stored: Any) -> str:
    """The rejection's message, however the backend handed back the stored exception."""
    if isinstance(stored, BaseException):
        return str(stored.args[0]) if stored.args else type(stored).__name__
    if isinstance(stored, dict):
        message = stored.get("exc_message")
        if isinstance(message, list | tuple):
            return str(message[0]) if message else str(stored.get("exc_type"))
        return str(message)
    return str(stored)


# --- typed helpers: one per command of the contract ------------------------------------

def send_users_create(data: UserCreate | dict[str, Any], *, command_id: str | None = None,
                      wait: float | None = None,
                      settings: Settings | None = None) -> SendResult:
    """Send `users.create`."""
    return send("users.create", data=data, command_id=command_id, wait=wait,
                settings=settings)


def send_users_update(id: int, data: UserUpdate | dict[str, Any], *,
                      command_id: str | None = None, expected_version: int | None = None,
                      wait: float | None = None,
                      settings: Settings | None = None) -> SendResult:
    """Send `users.update`: only the fields given change."""
    return send("users.update", id=id, data=data, command_id=command_id,
                expected_version=expected_version, wait=wait, settings=settings)


def send_users_delete(id: int, *, command_id: str | None = None,
                      expected_version: int | None = None, wait: float | None = None,
                      settings: Settings | None = None) -> SendResult:
    """Send `users.delete`: the user, their posts and those posts' tag links go."""
    return send("users.delete", id=id, command_id=command_id,
                expected_version=expected_version, wait=wait, settings=settings)


def send_posts_create(data: PostCreate | dict[str, Any], *, command_id: str | None = None,
                      wait: float | None = None,
                      settings: Settings | None = None) -> SendResult:
    """Send `posts.create`: tags named but missing are created."""
    return send("posts.create", data=data, command_id=command_id, wait=wait,
                settings=settings)


def send_posts_update(id: int, data: PostUpdate | dict[str, Any], *,
                      command_id: str | None = None, expected_version: int | None = None,
                      wait: float | None = None,
                      settings: Settings | None = None) -> SendResult:
    """Send `posts.update`: `tags` replaces the set."""
    return send("posts.update", id=id, data=data, command_id=command_id,
                expected_version=expected_version, wait=wait, settings=settings)


def send_posts_delete(id: int, *, command_id: str | None = None,
                      expected_version: int | None = None, wait: float | None = None,
                      settings: Settings | None = None) -> SendResult:
    """Send `posts.delete`."""
    return send("posts.delete", id=id, command_id=command_id,
                expected_version=expected_version, wait=wait, settings=settings)


def send_tags_create(data: TagCreate | dict[str, Any], *, command_id: str | None = None,
                     wait: float | None = None,
                     settings: Settings | None = None) -> SendResult:
    """Send `tags.create`."""
    return send("tags.create", data=data, command_id=command_id, wait=wait,
                settings=settings)


def send_tags_update(id: int, data: TagUpdate | dict[str, Any], *,
                     command_id: str | None = None, expected_version: int | None = None,
                     wait: float | None = None,
                     settings: Settings | None = None) -> SendResult:
    """Send `tags.update` (a rename)."""
    return send("tags.update", id=id, data=data, command_id=command_id,
                expected_version=expected_version, wait=wait, settings=settings)


def send_tags_delete(id: int, *, command_id: str | None = None,
                     expected_version: int | None = None, wait: float | None = None,
                     settings: Settings | None = None) -> SendResult:
    """Send `tags.delete`: its links to posts go too."""
    return send("tags.delete", id=id, command_id=command_id,
                expected_version=expected_version, wait=wait, settings=settings)
