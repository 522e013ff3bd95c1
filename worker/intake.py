"""Messages no task can run: undecodable, over-size, unknown task names. Each is a dead letter."""

from __future__ import annotations

import logging
from typing import Any

from celery.utils.objects import Bunch
from celery.worker.consumer.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed

from worker import deadletters
from worker.config import get_settings
from worker.db import transaction
from worker.errors import UnknownCommand
from worker.protocol import UndecodableMessage, decode, loads
from worker.security import printable

logger = logging.getLogger(__name__)



def record_raw(raw: bytes | str, reason: str, error: str, *, task: str | None = None,
               command_id: str | None = None, kwargs: dict[str, Any] | None = None) -> None:
    """A dead letter for a queue item that never reached a task."""
    with transaction() as session:
        deadletters.record(
            session, reason=reason, error=error, task=task, command_id=command_id,
            kwargs=kwargs, raw=deadletters.raw_evidence(raw),
        )
    logger.warning("dead letter (%s): %s", reason, error)


def record_queue_item(queue: str, raw: bytes) -> None:
    """Quarantine handler: an item on `queue` that is not a JSON envelope, or too large."""
    limit = get_settings().max_payload_bytes
    if len(raw) > limit:
        record_raw(raw, "invalid",
                   f"invalid: message of {len(raw)} bytes exceeds the limit of {limit} bytes")
        return
    try:
        decode(raw)
        problem = "the message envelope is malformed"
    except UndecodableMessage as error:
        problem = str(error)
    record_raw(raw, "undecodable", f"undecodable: {problem}")


def _identity(message: Any) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """(task name, idempotency key, kwargs) of a message, as far as they can be read safely."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task = headers.get("task") if isinstance(headers.get("task"), str) else None
    task_id = headers.get("id") if isinstance(headers.get("id"), str) else None
    kwargs: dict[str, Any] | None = None
    if message.content_type == "application/json":
        try:
            body = loads(message.body)
            if isinstance(body, list) and len(body) >= 2 and isinstance(body[1], dict):
                kwargs = body[1]
        except (ValueError, TypeError):
            kwargs = None
    command_id = kwargs.get("command_id") if kwargs else None
    key = command_id if isinstance(command_id, str) and 0 < len(command_id) <= 128 else task_id
    return task, key, kwargs


class Consumer(CeleryConsumer):
    """Celery's consumer, with every message it cannot run recorded as a dead letter.

    Stock Celery logs such a message with its body (passwords included) and drops it.
    """

    def _dead_letter(self, message: Any, reason: str, error: str) -> None:
        task, key, kwargs = _identity(message)
        try:
            body = message.body if isinstance(message.body, bytes | str) else repr(message.body)
            record_raw(body, reason, error, task=task, command_id=key, kwargs=kwargs)
        except Exception:
            logger.exception("could not record a %s dead letter; the message is requeued",
                             reason)
            message.reject_log_error(logger, self.connection_errors, requeue=True)
            return
        message.ack_log_error(logger, self.connection_errors)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        task, _, _ = _identity(message)
        rejection = UnknownCommand(f"no task named {printable(task)!r}")
        self._dead_letter(message, rejection.reason, str(rejection))
        task_id = message.headers.get("id") if isinstance(message.headers, dict) else None
        if isinstance(task_id, str):
            # A producer waiting on the result sees the rejection too.
            request = Bunch(name=task, chord=None, root_id=message.headers.get("root_id"),
                            correlation_id=message.properties.get("correlation_id"),
                            reply_to=message.properties.get("reply_to"), errbacks=None)
            try:
                self.app.backend.mark_as_failure(task_id, rejection, request=request,
                                                 store_result=True)
            except Exception:
                logger.warning("could not store the result of unknown task %s", task_id,
                               exc_info=True)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, "undecodable",
                          "undecodable: not a Celery protocol-2 message (no task header)")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if isinstance(exc, ContentDisallowed):
            self._dead_letter(message, "undecodable",
                              f"undecodable: content type {printable(message.content_type)!r} "
                              "is not accepted (only application/json)")
        else:
            self._dead_letter(message, "invalid", f"invalid: {type(exc).__name__}")

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._dead_letter(message, "undecodable",
                          f"undecodable: the body cannot be decoded ({type(exc).__name__})")
