"""Users: reads, create with a password hash, partial update, delete (posts cascade)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from worker import queries, writes
from worker.crud.common import applied
from worker.models import User
from worker.schemas import UserCreate, UserRecord, UserUpdate
from worker.security import hash_password


def get(session: Session, user_id: int, *, for_update: bool = False) -> User | None:
    """The user with `user_id`, locked for update when asked."""
    if for_update:
        # With a lock, Session.get always emits SELECT ... FOR UPDATE (no identity-map shortcut).
        return session.get(User, user_id, with_for_update=True)
    return session.scalars(queries.user_by_id(user_id)).first()


def get_by_email(session: Session, email: str) -> User | None:
    """The user whose email equals `email` without regard to case."""
    return session.scalars(queries.user_by_email(email)).first()


def get_by_username(session: Session, username: str) -> User | None:
    """The user named `username` (exact match)."""
    return session.scalars(queries.user_by_username(username)).first()


def list_(session: Session, skip: int = 0, limit: int = 100) -> list[User]:
    """Users ordered by id, `limit` of them after the first `skip`."""
    return list(session.scalars(queries.users_page(skip, limit)))


def _hashed(data: UserCreate | UserUpdate) -> Any:
    """`data` with its password replaced by the hash (what worker/writes.py stores)."""
    if data.password is None:
        return data
    return data.with_password_hash(hash_password(data.password.get_secret_value()))


def create(session: Session, data: UserCreate) -> User:
    """Insert a user (hashing its password); `Conflict` when the username or email is taken."""
    (outcome,) = writes.create_users(session, [_hashed(data)])
    user = session.get(User, applied(outcome)["id"])
    assert user is not None
    return user


def update(session: Session, user: User, data: UserUpdate) -> User:
    """Change only the fields given in `data` (a password is re-hashed); bumps the version."""
    (outcome,) = writes.update_users(session, [writes.Change(user.id, None, _hashed(data))])
    applied(outcome)
    session.refresh(user)
    return user


def delete(session: Session, user: User) -> None:
    """Delete `user`; the database cascades to their posts and those posts' tag links."""
    (outcome,) = writes.delete_users(session, [writes.Change(user.id, None)])
    applied(outcome)
    session.expunge(user)


def to_record(user: User) -> dict[str, Any]:
    """The user as a JSON-ready dict, without the password hash."""
    return UserRecord.model_validate(user).model_dump(mode="json")
