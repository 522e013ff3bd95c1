"""Dead letters: rejected and undeliverable commands, kept without secrets for replay."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from worker.models import DeadLetter
from worker.schemas import timestamp
from worker.security import REDACTED

RAW_BODY_LIMIT = 64 * 1024
# Scrubs a password out of text that could not be parsed as a message.
_PASSWORD_IN_TEXT = re.compile(r'("password"\s*:\s*)"(?:[^"\\]|\\.)*"', re.IGNORECASE)


def raw_text(raw: bytes | str) -> str:
    """A queue item as a dead letter keeps it: text, size-capped, password values replaced."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return _PASSWORD_IN_TEXT.sub(rf'\1"{REDACTED}"', text[:RAW_BODY_LIMIT])


def replayable_kwargs(kwargs: Any, password_hash: str | None) -> Any:
    """`kwargs` as a dead letter keeps them: a password becomes its hash, or is redacted."""
    if not isinstance(kwargs, dict):
        return kwargs
    kept = copy.deepcopy(kwargs)
    data = kept.get("data")
    if isinstance(data, dict) and "password" in data:
        del data["password"]
        if password_hash is not None:
            data["password_hash"] = password_hash
        else:
            data["password"] = REDACTED
    return kept


def storable(value: Any) -> Any:
    """`value` with NUL characters (which PostgreSQL cannot store) shown as `\\u0000`."""
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000")
    if isinstance(value, dict):
        return {storable(key): storable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [storable(item) for item in value]
    return value


def record(
    session: Session,
    *,
    reason: str,
    error: str,
    command_id: str | None = None,
    task: str | None = None,
    kwargs: dict[str, Any] | None = None,
    raw_body: str | None = None,
) -> int:
    """Insert a dead letter and return its id (over-long ids and task names cut to fit)."""
    letter = DeadLetter(
        command_id=storable(command_id)[:128] if command_id is not None else None,
        task=storable(task)[:200] if task is not None else None,
        reason=reason,
        error=storable(error[:4000]),
        kwargs=storable(kwargs),
        raw_body=storable(raw_body[:RAW_BODY_LIMIT]) if raw_body is not None else None,
    )
    session.add(letter)
    session.flush()
    return letter.id


def get(session: Session, letter_id: int) -> DeadLetter | None:
    """The dead letter with `letter_id`."""
    return session.get(DeadLetter, letter_id)


def list_(
    session: Session,
    *,
    reason: str | None = None,
    task: str | None = None,
    command_id: str | None = None,
    limit: int | None = None,
) -> Sequence[DeadLetter]:
    """Dead letters matching the filters, oldest first."""
    statement = select(DeadLetter).order_by(DeadLetter.id)
    if reason is not None:
        statement = statement.where(DeadLetter.reason == reason)
    if task is not None:
        statement = statement.where(DeadLetter.task == task)
    if command_id is not None:
        statement = statement.where(DeadLetter.command_id == command_id)
    if limit is not None:
        statement = statement.limit(limit)
    return session.scalars(statement).all()


def discard(session: Session, letter_id: int) -> bool:
    """Delete a dead letter; whether it existed."""
    deleted = session.execute(delete(DeadLetter).where(DeadLetter.id == letter_id))
    return bool(deleted.rowcount)  # type: ignore[attr-defined]


def to_dict(letter: DeadLetter) -> dict[str, Any]:
    """The dead letter as JSON-ready data (kwargs already hold no secrets)."""
    return {
        "id": letter.id,
        "command_id": letter.command_id,
        "task": letter.task,
        "reason": letter.reason,
        "error": letter.error,
        "kwargs": letter.kwargs,
        "received_at": timestamp(letter.received_at),
    }
