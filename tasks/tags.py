"""tags.create, tags.update, tags.delete."""

from __future__ import annotations

from sqlalchemy.orm import Session

from worker import crud
from worker.commands import Applied, command
from worker.errors import NotFound
from worker.schemas import CreateCommand, DeleteCommand, TagCreate, TagUpdate, UpdateCommand


@command("tags.create", CreateCommand, TagCreate)
def create(session: Session, command: CreateCommand, data: TagCreate) -> Applied:
    """Insert a tag."""
    tag = crud.tags.create(session, data)
    return Applied("tag", tag.id, crud.tags.to_record(tag))


@command("tags.update", UpdateCommand, TagUpdate)
def update(session: Session, command: UpdateCommand, data: TagUpdate) -> Applied:
    """Rename a tag."""
    tag = crud.tags.get(session, command.id, for_update=True)
    if tag is None:
        raise NotFound(f"tag {command.id} does not exist")
    crud.check_version(tag, command.expected_version)
    crud.tags.update(session, tag, data)
    return Applied("tag", tag.id, crud.tags.to_record(tag))


@command("tags.delete", DeleteCommand)
def delete(session: Session, command: DeleteCommand, data: None) -> Applied:
    """Delete the tag and its links to posts."""
    tag = crud.tags.get(session, command.id, for_update=True)
    if tag is None:
        raise NotFound(f"tag {command.id} does not exist")
    crud.check_version(tag, command.expected_version)
    record = crud.tags.to_record(tag)
    crud.tags.delete(session, tag)
    return Applied("tag", command.id, record)
