"""Users: reads, create with a password hash, partial update, delete (posts cascade)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from worker import queries
from worker.errors import Conflict
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


def _password_hash(data: UserCreate | UserUpdate) -> str | None:
    if data.password_hash is not None:
        return data.password_hash
    if data.password is not None:
        return hash_password(data.password.get_secret_value())
    return None


def _check_unique(
    session: Session, user_id: int | None, username: str | None, email: str | None
) -> None:
    if username is not None:
        holder = get_by_username(session, username)
        if holder is not None and holder.id != user_id:
            raise Conflict("username already taken")
    if email is not None:
        holder = get_by_email(session, email)
        if holder is not None and holder.id != user_id:
            raise Conflict("email already registered")


def create(session: Session, data: UserCreate) -> User:
    """Insert a user; `Conflict` when the username or email is taken."""
    _check_unique(session, None, data.username, data.email)
    hashed = _password_hash(data)
    assert hashed is not None  # UserCreate requires a password or its hash
    user = User(
        username=data.username,
        email=data.email,
        hashed_password=hashed,
        is_active=data.is_active,
    )
    session.add(user)
    session.flush()
    return user


def update(session: Session, user: User, data: UserUpdate) -> User:
    """Change only the fields given in `data` (a password is re-hashed)."""
    _check_unique(session, user.id, data.username, data.email)
    if data.username is not None:
        user.username = data.username
    if data.email is not None:
        user.email = data.email
    if data.is_active is not None:
        user.is_active = data.is_active
    hashed = _password_hash(data)
    if hashed is not None:
        user.hashed_password = hashed
    user.version += 1
    session.flush()
    return user


def delete(session: Session, user: User) -> None:
    """Delete `user`; the database cascades to their posts and those posts' tag links."""
    session.delete(user)
    session.flush()


def to_record(user: User) -> dict[str, Any]:
    """The user as a JSON-ready dict, without the password hash."""
    return UserRecord.model_validate(user).model_dump(mode="json")
