"""The command ledger: which idempotency keys were applied, with their first result."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from worker.models import CommandRecord


def claim(session: Session, command_id: str, task: str) -> dict[str, Any] | None:
    """Claim `command_id` for this transaction; the stored result if it was applied before.

    The insert waits for a concurrent transaction holding the same key, so a command sent
    many times at once is applied by exactly one of them and the rest see its result.
    """
    claimed = session.execute(
        insert(CommandRecord)
        .values(command_id=command_id, task=task, result={})
        .on_conflict_do_nothing(index_elements=[CommandRecord.command_id])
        .returning(CommandRecord.command_id)
    ).first()
    if claimed is not None:
        return None
    stored = session.scalar(
        select(CommandRecord.result).where(CommandRecord.command_id == command_id)
    )
    return dict(stored) if stored is not None else {}


def record(session: Session, command_id: str, result: dict[str, Any]) -> None:
    """Store the result of the command this transaction claimed."""
    session.execute(
        update(CommandRecord).where(CommandRecord.command_id == command_id).values(result=result)
    )


def get(session: Session, command_id: str) -> CommandRecord | None:
    """The ledger entry of `command_id`, if it was applied."""
    return session.get(CommandRecord, command_id)
