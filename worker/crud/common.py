"""What every entity's data access shares: paging limits and the version check."""

from __future__ import annotations

from typing import Any, Protocol

from worker.errors import CommandRejected, Invalid, Stale

MAX_PAGE_SIZE = 1000


class Versioned(Protocol):
    """An entity with an optimistic-concurrency version."""

    id: int
    version: int


def page(skip: int, limit: int) -> tuple[int, int]:
    """`(skip, limit)` checked: skip >= 0, 1 <= limit <= MAX_PAGE_SIZE."""
    if skip < 0:
        raise Invalid("skip must be 0 or more")
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise Invalid(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    return skip, limit


def check_version(entity: Versioned, expected_version: int | None) -> None:
    """Raise `Stale` when `expected_version` is given and differs from the stored version."""
    if expected_version is not None and entity.version != expected_version:
        raise Stale(f"expected version {expected_version}, stored version is {entity.version}")


def applied(outcome: CommandRejected | dict[str, Any]) -> dict[str, Any]:
    """The record a set-based write stored, or its rejection raised."""
    if isinstance(outcome, CommandRejected):
        raise outcome
    return outcome
