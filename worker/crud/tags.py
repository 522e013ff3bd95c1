"""Tags: reads, create, rename, delete (links to posts cascade), get-or-create by name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from worker import queries
from worker.errors import Conflict
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
    if get_by_name(session, data.name) is not None:
        raise Conflict("tag name already taken")
    tag = Tag(name=data.name)
    session.add(tag)
    session.flush()
    return tag


def update(session: Session, tag: Tag, data: TagUpdate) -> Tag:
    """Rename `tag`; `Conflict` when another tag has the name."""
    holder = get_by_name(session, data.name)
    if holder is not None and holder.id != tag.id:
        raise Conflict("tag name already taken")
    tag.name = data.name
    tag.version += 1
    session.flush()
    return tag


def delete(session: Session, tag: Tag) -> None:
    """Delete `tag`; the database removes its links to posts."""
    session.delete(tag)
    session.flush()


def get_or_create_many(session: Session, names: Iterable[str]) -> list[Tag]:
    """The tags named `names` (each once, in the order given), creating the missing ones."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return []
    # ON CONFLICT DO NOTHING waits for a concurrent insert of the same name instead of failing.
    session.execute(
        insert(Tag)
        .values([{"name": name} for name in wanted])
        .on_conflict_do_nothing(index_elements=[Tag.name])
    )
    by_name = {tag.name: tag for tag in session.scalars(select(Tag).where(Tag.name.in_(wanted)))}
    return [by_name[name] for name in wanted]


def to_record(tag: Tag) -> dict[str, Any]:
    """The tag as a JSON-ready dict."""
    return TagRecord.model_validate(tag).model_dump(mode="json")
