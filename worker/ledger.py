"""The command ledger: which idempotency keys were applied, with their first result.

Written by worker/apply.py in each command's own transaction; read here.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from worker.models import CommandRecord


def get(session: Session, command_id: str) -> CommandRecord | None:
    """The ledger entry of `command_id`, if it was applied."""
    return session.get(CommandRecord, command_id)
