"""Replaying dead letters: each command applied again in this process, through worker/apply.py.

A replay publishes nothing. A dead letter keeps a password only as its argon2id hash, and a
hash is not something a producer may send (`password_hash` is not a field of the contract),
so the command is applied here by the same engine as every consumer's (`apply.run_batch`),
the hash carried in `Command.kept_password_hash`, under its original key: a command applied
meanwhile comes back `duplicate`, one rejected again gets a new dead letter.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from worker import apply, deadletters
from worker.db import transaction
from worker.models import DeadLetter
from worker.security import NESTED_TOO_DEEPLY, REDACTED, REDACTED_KEY, UNREPRESENTABLE

# What `security.redact` and `deadletters.jsonable` put in place of what they could not keep:
# a command holding one of these is not the command first sent.
_MARKERS = (REDACTED, REDACTED_KEY, NESTED_TOO_DEEPLY, UNREPRESENTABLE, "[integer of ")
_SANITIZED_NUMBERS = frozenset({"NaN", "Infinity", "-Infinity"})
_ESCAPED_TEXT = re.compile(r"\\u0000|\\ud[89a-f][0-9a-f]{2}", re.IGNORECASE)


def _altered(value: Any) -> bool:
    """Whether `value` holds something redaction or sanitizing put in place of the original."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if any(marker in key for marker in _MARKERS) or _ESCAPED_TEXT.search(key):
                    return True
                pending.append(child)
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str) and (
                item in _SANITIZED_NUMBERS or any(marker in item for marker in _MARKERS)
                or _ESCAPED_TEXT.search(item)):
            return True
    return False


@dataclass(frozen=True)
class Replay:
    """What a replay needs of a dead letter, read before anything is applied."""

    letter_id: int
    task: str | None
    command_id: str | None
    kwargs: dict[str, Any] | None
    password_hash: str | None

    @classmethod
    def of(cls, letter: DeadLetter) -> Replay:
        """The replay of `letter`."""
        return cls(letter.id, letter.task, letter.command_id, letter.kwargs,
                   letter.password_hash)

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments to apply: as kept, under the original key, the hash standing
        for the password."""
        kwargs = dict(self.kwargs or {})
        if self.command_id:
            # The original key (the task id when none was given): an applied one is a
            # duplicate, not applied twice.
            kwargs["command_id"] = self.command_id
        data = kwargs.get("data")
        if self.password_hash is not None and isinstance(data, dict):
            kwargs["data"] = {name: value for name, value in data.items() if name != "password"}
        return kwargs

    @property
    def problem(self) -> str | None:
        """Why this dead letter cannot be replayed as first sent; None when it can."""
        if not self.task:
            return "no task name was kept"
        if not isinstance(self.kwargs, dict):
            return "no keyword arguments were kept"
        if "args" in self.kwargs:
            return "it had positional arguments"
        if _altered(self.arguments()):
            return ("some of its arguments were not kept as sent (a secret other than a "
                    "password, or a value PostgreSQL cannot store)")
        return None

    def command(self) -> apply.Command:
        """The command to apply (only when `problem` is None)."""
        assert self.task is not None
        # Without a key of its own (its first sending had none usable) it gets a new one.
        return apply.Command(task=self.task,
                             task_id=None if self.command_id else f"replay-{uuid.uuid4()}",
                             kwargs=self.arguments(), kept_password_hash=self.password_hash)


def outcome(replay: Replay, command: apply.Command) -> dict[str, Any]:
    """What became of a replayed command, as the command line shows it."""
    row: dict[str, Any] = {"dead_letter": replay.letter_id, "task": replay.task,
                           "command_id": command.key}
    if command.rejection is not None:
        row.update(outcome="rejected", reason=command.rejection.reason,
                   error=str(command.rejection))
    else:
        assert command.result is not None
        row.update(outcome=command.result["outcome"], entity=command.result.get("entity"),
                   id=command.result.get("id"))
    return row


def apply_again(replay: Replay) -> dict[str, Any]:
    """Apply a dead letter's command again and delete the dead letter; its outcome.

    Database faults raise, and the dead letter stays. The letter is deleted after the
    command's transaction: a crash in between leaves it, and replaying it again finds the
    command `duplicate` (or records a second dead letter for it).
    """
    command = replay.command()
    apply.run_batch([command])
    with transaction() as session:
        deadletters.discard(session, replay.letter_id)
    return outcome(replay, command)
