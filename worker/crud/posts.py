"""Posts: eager-loaded reads, create with tags, partial update (tags replace the set), delete."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, selectinload

from worker import queries, writes
from worker.crud.common import applied
from worker.models import Post
from worker.schemas import PostCreate, PostDetail, PostRecord, PostUpdate, UserRecord


def get(session: Session, post_id: int, *, for_update: bool = False) -> Post | None:
    """The post with `post_id`, its author and tags loaded; locked for update when asked."""
    if for_update:
        # Not the shared statement: FOR UPDATE would also lock the author through its join.
        return session.get(Post, post_id, with_for_update=True, options=[selectinload(Post.tags)])
    return session.scalars(queries.post_by_id(post_id)).first()


def list_(session: Session, skip: int = 0, limit: int = 100) -> list[Post]:
    """Posts ordered by id, with author and tags, `limit` of them after the first `skip`."""
    return list(session.scalars(queries.posts_page(skip, limit)))


def list_by_author(session: Session, author_id: int, skip: int = 0, limit: int = 100) -> list[Post]:
    """An author's posts ordered by id, with author and tags."""
    return list(session.scalars(queries.posts_page(skip, limit, author_id=author_id)))


def create(session: Session, data: PostCreate) -> Post:
    """Insert a post by an existing author; tags named but missing are created."""
    (outcome,) = writes.create_posts(session, [data])
    post = get(session, applied(outcome)["id"])
    assert post is not None
    return post


def update(session: Session, post: Post, data: PostUpdate) -> Post:
    """Change only the fields given; `tags` replaces the whole set; bumps the version."""
    (outcome,) = writes.update_posts(session, [writes.Change(post.id, None, data)])
    applied(outcome)
    session.refresh(post)
    session.refresh(post, ["tags"])
    return post


def delete(session: Session, post: Post) -> None:
    """Delete `post`; the database removes its tag links."""
    (outcome,) = writes.delete_posts(session, [writes.Change(post.id, None)])
    applied(outcome)
    session.expunge(post)


def to_record(post: Post) -> dict[str, Any]:
    """The post as a JSON-ready dict with its tag names."""
    return PostRecord(
        id=post.id,
        title=post.title,
        content=post.content,
        author_id=post.author_id,
        created_at=post.created_at,
        version=post.version,
        tags=sorted(tag.name for tag in post.tags),
    ).model_dump(mode="json")


def to_detail(post: Post) -> dict[str, Any]:
    """The post with its author, for readers."""
    return PostDetail(
        **PostRecord.model_validate(to_record(post)).model_dump(),
        author=UserRecord.model_validate(post.author),
    ).model_dump(mode="json")
