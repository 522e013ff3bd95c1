"""Tags: reads, create, rename, delete (links to posts cascade), get-or-create by name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker import queries, writes
from worker.crud.common import applied
from worker.models import Tag
from worker.schemas import TagCreate, TagRecord, TagUpdate


def get(session: Session, tag_id: int, *, for_update: bool = False) -> Tag | None:
    """The tag with `tag_id`, locked for update when asked."""
    if for_update:
        # With a lock, Session.get always emits SELECT ... FOR UPDATE (no identity-map shortcut).
        return session.get(Tag, tag_id, with_for_update=True)
    return session.scalars(queries.tag_by_id(tag_id)).first()


def get_by_name(session: Session, name: str) -> Tag | None:
    """The tag named `name`."""
    return session.scalars(queries.tag_by_name(name)).first()


def list_(session: Session, skip: int = 0, limit: int = 100) -> list[Tag]:
    """Tags ordered by id, `limit` of them after the first `skip`."""
    return list(session.scalars(queries.tags_page(skip, limit)))


def create(session: Session, data: TagCreate) -> Tag:
    """Insert a tag; `Conflict` when the name is taken."""
    (outcome,) = writes.create_tags(session, [data])
    tag = session.get(Tag, applied(outcome)["id"])
    assert tag is not None
    return tag


def update(session: Session, tag: Tag, data: TagUpdate) -> Tag:
    """Rename `tag` (bumping its version); `Conflict` when another tag has the name."""
    (outcome,) = writes.update_tags(session, [writes.Change(tag.id, None, data)])
    applied(outcome)
    session.refresh(tag)
    return tag


def delete(session: Session, tag: Tag) -> None:
    """Delete `tag`; the database removes its links to posts."""
    (outcome,) = writes.delete_tags(session, [writes.Change(tag.id, None)])
    applied(outcome)
    session.expunge(tag)


def get_or_create_many(session: Session, names: Iterable[str]) -> list[Tag]:
    """The tags named `names` (each once, in the order given), creating the missing ones."""
    wanted = list(dict.fromkeys(names))
    ids = writes.ensure_tags(session, wanted)
    by_id = {tag.id: tag for tag in session.scalars(select(Tag).where(Tag.id.in_(ids.values())))}
    return [by_id[ids[name]] for name in wanted]


def to_record(tag: Tag) -> dict[str, Any]:
    """The tag as a JSON-ready dict."""
    return TagRecord.model_validate(tag).model_dump(mode="json")
