"""How one command runs: validate, one transaction with the ledger, result or dead letter."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import celery
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from worker import deadletters, ledger
from worker.celery_app import RedactingRequest, app
from worker.config import get_settings
from worker.db import transaction
from worker.errors import CommandRejected, Conflict, Invalid, NotFound, RetriesExhausted
from worker.schemas import CommandResult, parse
from worker.security import hash_password
from worker.transport import DELIVERY_COUNT_HEADER

logger = logging.getLogger(__name__)

EnvelopeT = TypeVar("EnvelopeT", bound=BaseModel)
DataT = TypeVar("DataT", bound=BaseModel | None)
Entity = Literal["user", "post", "tag"]

# SQLSTATEs worth another try: serialization failure, deadlock, lock timeout, statement
# timeout, admin/crash shutdown, cannot connect now, too many connections, connection errors.
TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",
        "40P01",
        "55P03",
        "57014",
        "57P01",
        "57P02",
        "57P03",
        "53300",
        "08000",
        "08001",
        "08003",
        "08004",
        "08006",
    }
)


@dataclass(frozen=True)
class Applied:
    """What a command handler did: the entity, its id and its record as stored."""

    entity: Entity
    id: int
    data: dict[str, Any]


Handler = Callable[[Session, EnvelopeT, DataT], Applied]


@dataclass(frozen=True)
class CommandSpec(Generic[EnvelopeT, DataT]):
    """A command: its keyword-argument model, its `data` model and its handler."""

    name: str
    envelope: type[EnvelopeT]
    data_model: type[BaseModel] | None
    handler: Handler[EnvelopeT, DataT]


class CommandTask(celery.Task):
    """Base of every command task: acks after commit, redelivers work of a dead worker."""

    Request = RedactingRequest
    acks_late = True
    reject_on_worker_lost = True
    # Rejections are outcomes, not crashes: log them without a traceback.
    throws = (CommandRejected,)
    spec: CommandSpec[Any, Any]


def idempotency_key(kwargs: dict[str, Any], task_id: str | None) -> str | None:
    """The command's key: a well-formed `command_id`, else the message's task id."""
    command_id = kwargs.get("command_id")
    if isinstance(command_id, str) and 1 <= len(command_id) <= 128 and "\x00" not in command_id:
        return command_id
    return task_id


def is_transient(error: BaseException) -> bool:
    """Whether `error` is a fault that another try may not meet (connection, lock, deadlock)."""
    if isinstance(error, sa_exc.TimeoutError | StaleDataError):
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        sqlstate = getattr(error.orig, "pgcode", None)
        if sqlstate is None:
            return isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError)
        return sqlstate in TRANSIENT_SQLSTATES
    return False


def rejection_for(error: sa_exc.DBAPIError) -> CommandRejected | None:
    """The rejection a database error stands for, if it is a permanent one."""
    sqlstate = getattr(error.orig, "pgcode", None)
    if sqlstate == "23505":
        return Conflict("a unique value is taken")
    if sqlstate == "23503":
        return NotFound("a referenced record does not exist")
    if sqlstate is not None and sqlstate.startswith("22"):
        return Invalid("a value does not fit its column")
    return None


def retry_delay(retries: int) -> float:
    """Exponential backoff with full jitter, capped by the settings."""
    ceiling = min(get_settings().retry_backoff_max, 0.1 * 2**retries)
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security


def _prepare(
    spec: CommandSpec[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[BaseModel, BaseModel | None, str | None]:
    if args:
        raise Invalid("positional arguments are not accepted: send keyword arguments only")
    envelope = parse(spec.envelope, kwargs)
    if spec.data_model is None:
        return envelope, None, None
    data = parse(spec.data_model, envelope.data, "data")
    password = getattr(data, "password", None)
    if password is None:
        return envelope, data, None
    # Hash before the transaction opens: the slow part holds no connection or lock.
    hashed = hash_password(password.get_secret_value())
    return envelope, data.model_copy(update={"password": None, "password_hash": hashed}), hashed


def execute(task: CommandTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run one command as one transaction; on rejection record a dead letter and raise."""
    spec = task.spec
    key = idempotency_key(kwargs, task.request.id)
    password_hash: str | None = None
    try:
        deliveries = int(getattr(task.request, DELIVERY_COUNT_HEADER, None) or 0)
        if deliveries > get_settings().max_deliveries:
            # Every earlier delivery ended with its worker gone: stop the loop here.
            raise RetriesExhausted(
                f"delivered {deliveries} times without finishing (its worker died each time)"
            )
        envelope, data, password_hash = _prepare(spec, args, kwargs)
        assert key is not None
        with transaction() as session:
            stored = ledger.claim(session, key, spec.name)
            if stored is not None:
                return {**stored, "outcome": "duplicate"}
            applied = spec.handler(session, envelope, data)
            result = CommandResult(
                command_id=key,
                outcome="applied",
                entity=applied.entity,
                id=applied.id,
                data=applied.data,
            ).model_dump(mode="json")
            ledger.record(session, key, result)
        return result
    except CommandRejected as rejection:
        _dead_letter(task, key, args, kwargs, rejection, password_hash)
        raise
    except sa_exc.SQLAlchemyError as error:
        if is_transient(error):
            if task.request.retries < get_settings().max_retries:
                logger.warning(
                    "transient fault in %s, retrying: %s", spec.name, type(error).__name__
                )
                raise task.retry(
                    countdown=retry_delay(task.request.retries),
                    max_retries=get_settings().max_retries,
                    exc=error,
                ) from None
            exhausted = RetriesExhausted(
                f"gave up after {task.request.retries} retries: {type(error).__name__}"
            )
            _dead_letter(task, key, args, kwargs, exhausted, password_hash)
            raise exhausted from None
        permanent = rejection_for(error) if isinstance(error, sa_exc.DBAPIError) else None
        if permanent is None:
            raise
        _dead_letter(task, key, args, kwargs, permanent, password_hash)
        raise permanent from None


def _dead_letter(
    task: CommandTask,
    key: str | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rejection: CommandRejected,
    password_hash: str | None,
) -> None:
    kept = deadletters.replayable_kwargs(kwargs, password_hash)
    if args:
        kept = {"args": deadletters.replayable_kwargs(list(args), None), **kept}
    try:
        with transaction() as session:
            deadletters.record(
                session,
                command_id=key,
                task=task.name,
                reason=rejection.reason,
                error=str(rejection),
                kwargs=kept,
            )
    except sa_exc.SQLAlchemyError as error:
        if not is_transient(error):
            raise
        # The rejection is not recorded yet: keep the command until the database is back.
        raise task.retry(
            countdown=get_settings().retry_backoff_max, max_retries=None, exc=error
        ) from None


def command(
    name: str, envelope: type[EnvelopeT], data_model: type[BaseModel] | None = None
) -> Callable[[Handler[EnvelopeT, DataT]], CommandTask]:
    """Register `handler` as the Celery task `name` (keyword arguments `envelope`)."""

    def register(handler: Handler[EnvelopeT, DataT]) -> CommandTask:
        spec = CommandSpec(name=name, envelope=envelope, data_model=data_model, handler=handler)
        task: CommandTask = app.task(
            name=name, base=CommandTask, bind=True, spec=spec, typing=False
        )(_run)
        return task

    return register


def _run(self: CommandTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return execute(self, args, kwargs)
