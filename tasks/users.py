"""users.create, users.update, users.delete."""

from __future__ import annotations

from sqlalchemy.orm import Session

from worker import crud
from worker.commands import Applied, command
from worker.errors import NotFound
from worker.schemas import CreateCommand, DeleteCommand, UpdateCommand, UserCreate, UserUpdate


@command("users.create", CreateCommand, UserCreate)
def create(session: Session, command: CreateCommand, data: UserCreate) -> Applied:
    """Insert a user."""
    user = crud.users.create(session, data)
    return Applied("user", user.id, crud.users.to_record(user))


@command("users.update", UpdateCommand, UserUpdate)
def update(session: Session, command: UpdateCommand, data: UserUpdate) -> Applied:
    """Change only the fields given."""
    user = crud.users.get(session, command.id, for_update=True)
    if user is None:
        raise NotFound(f"user {command.id} does not exist")
    crud.check_version(user, command.expected_version)
    crud.users.update(session, user, data)
    return Applied("user", user.id, crud.users.to_record(user))


@command("users.delete", DeleteCommand)
def delete(session: Session, command: DeleteCommand, data: None) -> Applied:
    """Delete the user, their posts and those posts' tag links."""
    user = crud.users.get(session, command.id, for_update=True)
    if user is None:
        raise NotFound(f"user {command.id} does not exist")
    crud.check_version(user, command.expected_version)
    record = crud.users.to_record(user)
    crud.users.delete(session, user)
    return Applied("user", command.id, record)
