"""Posts: eager-loaded reads, create with tags, partial update (tags replace the set), delete."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, selectinload

from worker import queries
from worker.crud import tags as tags_crud
from worker.crud import users as users_crud
from worker.errors import NotFound
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
    # A concurrent delete of the author still fails the insert on the foreign key (not_found).
    if users_crud.get(session, data.author_id) is None:
        raise NotFound(f"author {data.author_id} does not exist")
    post = Post(title=data.title, content=data.content, author_id=data.author_id)
    post.tags = tags_crud.get_or_create_many(session, data.tags)
    session.add(post)
    session.flush()
    return post


def update(session: Session, post: Post, data: PostUpdate) -> Post:
    """Change only the fields given; `tags` replaces the whole set."""
    fields = data.model_fields_set
    if "title" in fields and data.title is not None:
        post.title = data.title
    if "content" in fields:
        post.content = data.content
    if "tags" in fields and data.tags is not None:
        post.tags = tags_crud.get_or_create_many(session, data.tags)
    post.version += 1
    session.flush()
    return post


def delete(session: Session, post: Post) -> None:
    """Delete `post`; the database removes its tag links."""
    session.delete(post)
    session.flush()


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
