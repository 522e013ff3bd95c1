"""The Celery side of a command: a task applies a batch of one through worker/apply.py."""

from __future__ import annotations

import logging
import random
from typing import Any

import celery
from celery.exceptions import Reject
from sqlalchemy import exc as sa_exc

from worker import apply
from worker.celery_app import RedactingRequest, app
from worker.config import get_settings
from worker.errors import CommandRejected
from worker.transport import DELIVERY_COUNT_HEADER

logger = logging.getLogger(__name__)


class CommandTask(celery.Task):
    """Base of every command task: acks after commit, redelivers work of a dead worker."""

    Request = RedactingRequest
    acks_late = True
    reject_on_worker_lost = True
    # Rejections are outcomes, not crashes: log them without a traceback.
    throws = (CommandRejected,)
    typing = False


def retry_delay(retries: int) -> float:
    """Exponential backoff with jitter, capped by the settings."""
    ceiling = min(get_settings().retry_backoff_max, 0.1 * 2**retries)
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security


def execute(task: CommandTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Apply one command; return its result, or raise its rejection (already dead-lettered)."""
    command = apply.Command(
        task=task.name, task_id=task.request.id, kwargs=kwargs, args=list(args),
        deliveries=int(getattr(task.request, DELIVERY_COUNT_HEADER, None) or 1),
    )
    try:
        apply.run_batch([command])
    except sa_exc.SQLAlchemyError as error:
        if not apply.is_transient(error):
            raise _redeliver(error) from error
        retries = task.request.retries
        if retries < get_settings().max_retries:
            logger.warning("transient fault in %s, retrying: %s", task.name,
                           type(error).__name__)
            raise task.retry(countdown=retry_delay(retries),
                             max_retries=get_settings().max_retries, exc=error) from None
        try:
            apply.record_exhausted(command, f"gave up after {retries} retries: "
                                            f"{type(error).__name__}")
        except sa_exc.SQLAlchemyError as still_down:
            # Not recorded yet: keep the command until the database is back.
            raise task.retry(countdown=get_settings().retry_backoff_max, max_retries=None,
                             exc=still_down) from None
    except CommandRejected:
        raise
    except Exception as error:
        raise _redeliver(error) from error
    if command.rejection is not None:
        raise command.rejection
    assert command.result is not None
    return command.result


def _redeliver(error: Exception) -> Reject:
    """A bug, not a fault of the input: back on the queue, counted, never silently dropped.

    After MAX_DELIVERIES such deliveries the command becomes a `retries_exhausted` dead letter.
    """
    logger.error("unexpected %s; the command goes back on the queue", type(error).__name__,
                 exc_info=error)
    return Reject(repr(error), requeue=True)


def command_task(name: str) -> CommandTask:
    """Register the Celery task `name`, which applies that command."""

    def run(self: CommandTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return execute(self, args, kwargs)

    run.__name__ = run.__qualname__ = name.replace(".", "_")
    task: CommandTask = app.task(name=name, base=CommandTask, bind=True, shared=False)(run)
    return task
