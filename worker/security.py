"""Password hashing (argon2id) and the redaction of secrets from anything that leaves a task."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from worker.config import get_settings

REDACTED = "[redacted]"
SECRET_FIELDS = frozenset({"password"})


@lru_cache(maxsize=1)
def password_hasher() -> PasswordHasher:
    """The argon2id hasher with the configured cost."""
    settings = get_settings()
    return PasswordHasher(
        time_cost=settings.password_hash_time_cost,
        memory_cost=settings.password_hash_memory_kib,
        parallelism=settings.password_hash_parallelism,
    )


def hash_password(password: str) -> str:
    """A salted argon2id hash of `password`."""
    return password_hasher().hash(password)


def verify_password(hashed: str, password: str) -> bool:
    """Whether `password` matches `hashed`."""
    try:
        return password_hasher().verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


def is_password_hash(value: object) -> bool:
    """Whether `value` is an argon2id hash (what a dead letter keeps instead of a password)."""
    return isinstance(value, str) and value.startswith("$argon2id$") and len(value) <= 255


def redact(value: Any) -> Any:
    """A copy of `value` with every secret field's value replaced, at any depth."""
    if isinstance(value, dict):
        return {
            key: (REDACTED if key in SECRET_FIELDS else redact(item)) for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def safe_repr(value: Any, limit: int = 200) -> str:
    """A short repr of `value` with every secret replaced: for logs, events and Flower."""
    import reprlib

    shortened = reprlib.Repr()
    shortened.maxstring = shortened.maxother = limit
    shortened.maxlevel = 4
    return shortened.repr(redact(value))
