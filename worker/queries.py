"""The read statements, built once: the sync CRUD layer and the async readers both execute them."""

from __future__ import annotations

from sqlalchemy import Select, func, select
from sqlalchemy.orm import joinedload, selectinload

from worker.crud.common import page
from worker.models import Post, Tag, User


def user_by_id(user_id: int) -> Select[User]:
    """The user with `user_id`."""
    return select(User).where(User.id == user_id)


def user_by_email(email: str) -> Select[User]:
    """The user whose email equals `email` without regard to case (served by the lower() index)."""
    return select(User).where(func.lower(User.email) == email.lower())


def user_by_username(username: str) -> Select[User]:
    """The user named `username` (exact match)."""
    return select(User).where(User.username == username)


def users_page(skip: int = 0, limit: int = 100) -> Select[User]:
    """Users ordered by id, `limit` of them after the first `skip` (limits checked)."""
    skip, limit = page(skip, limit)
    return select(User).order_by(User.id).offset(skip).limit(limit)


def _posts_with_relations() -> Select[Post]:
    # joinedload for the one author, selectinload for the many tags: two statements per page,
    # and both loaders work on an AsyncSession too (nothing is left to a lazy load).
    return select(Post).options(joinedload(Post.author), selectinload(Post.tags))


def post_by_id(post_id: int) -> Select[Post]:
    """The post with `post_id`, its author and tags loaded with it."""
    return _posts_with_relations().where(Post.id == post_id)


def posts_page(skip: int = 0, limit: int = 100, *, author_id: int | None = None) -> Select[Post]:
    """Posts (of `author_id` when given) ordered by id, with author and tags (limits checked)."""
    skip, limit = page(skip, limit)
    statement = _posts_with_relations()
    if author_id is not None:
        statement = statement.where(Post.author_id == author_id)
    return statement.order_by(Post.id).offset(skip).limit(limit)


def tag_by_id(tag_id: int) -> Select[Tag]:
    """The tag with `tag_id`."""
    return select(Tag).where(Tag.id == tag_id)


def tag_by_name(name: str) -> Select[Tag]:
    """The tag named `name`."""
    return select(Tag).where(Tag.name == name)


def tags_page(skip: int = 0, limit: int = 100) -> Select[Tag]:
    """Tags ordered by id, `limit` of them after the first `skip` (limits checked)."""
    skip, limit = page(skip, limit)
    return select(Tag).order_by(Tag.id).offset(skip).limit(limit)
