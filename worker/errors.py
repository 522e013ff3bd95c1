"""One root exception; each rejection class maps to one dead-letter reason of the contract.

Operator errors (the setup, not a command, is wrong) are the other branch: the command line
reports each in one line and exits 3.
"""

from __future__ import annotations

from typing import ClassVar


class WorkerError(Exception):
    """Root of every error this project raises on purpose."""


class OperatorError(WorkerError):
    """The worker cannot run as configured; the message says what to change, in one line."""


class BadConfiguration(OperatorError):
    """A setting, from the environment or `.env`, has a value the worker cannot use."""


class NoServerError(OperatorError):
    """No URL is configured and no `python -m worker run` is serving this directory."""


class CommandRejected(WorkerError):
    """A command that ends rejected: its message always starts with its reason."""

    reason: ClassVar[str] = "rejected"

    def __init__(self, detail: str = "") -> None:
        # Celery rebuilds an exception from its args, so the reason lives in args[0] exactly once.
        prefix = f"{self.reason}: "
        message = detail if detail.startswith(prefix) else prefix + detail
        super().__init__(message)

    @property
    def detail(self) -> str:
        """The message without the reason prefix."""
        return str(self.args[0]).removeprefix(f"{self.reason}: ")


class Invalid(CommandRejected):
    """The command fails validation."""

    reason = "invalid"


class NotFound(CommandRejected):
    """The id, or a referenced id, does not exist."""

    reason = "not_found"


class Conflict(CommandRejected):
    """A unique value is taken."""

    reason = "conflict"


class Stale(CommandRejected):
    """`expected_version` did not match the stored version."""

    reason = "stale"


class RetriesExhausted(CommandRejected):
    """A transient fault outlasted the retry policy."""

    reason = "retries_exhausted"


class TimeLimitExceeded(RetriesExhausted):
    """A command outlasted its time limit (a message's `timelimit`, or its task's).

    Named as Celery's own exception, which is what a producer that set the limit expects in
    the result; its reason is `retries_exhausted`: the command can be replayed without it.
    """


class UnknownCommand(CommandRejected):
    """No task has this name."""

    reason = "unknown_command"


class Undecodable(CommandRejected):
    """The message is not a JSON Celery message."""

    reason = "undecodable"


REJECTIONS: dict[str, type[CommandRejected]] = {
    cls.reason: cls
    for cls in (Invalid, NotFound, Conflict, Stale, RetriesExhausted, UnknownCommand, Undecodable)
}


def first_line(error: BaseException) -> str:
    """The first line of a driver's message (SQLAlchemy appends a long footer)."""
    lines = str(getattr(error, "orig", None) or error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
