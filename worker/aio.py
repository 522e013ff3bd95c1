"""Async reads: the statements of worker/queries.py executed on an asyncpg `AsyncSession`."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import Select, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import raiseload

from worker import queries
from worker.config import Settings, database_url, get_settings
from worker.db import pool_options
from worker.models import Post, Tag, User

EntityT = TypeVar("EntityT", User, Post, Tag)


def async_url(url: str) -> str:
    """`url` with the asyncpg driver, whatever driver it names."""
    parsed = make_url(url).set(drivername="postgresql+asyncpg")
    # The URL's query becomes asyncpg.connect() keywords: libpq's `sslmode` is asyncpg's `ssl`.
    if "sslmode" in parsed.query:
        query = dict(parsed.query)
        query.setdefault("ssl", query.pop("sslmode"))
        parsed = parsed.set(query=query)
    return parsed.render_as_string(hide_password=False)


def async_engine(url: str | None = None, settings: Settings | None = None) -> AsyncEngine:
    """A new pooled asyncpg engine with the pool and timeouts of worker.db.build_engine.

    Its connections belong to the event loop that opens them: build one per loop and
    `await engine.dispose()` before the loop ends.
    """
    settings = settings or get_settings()
    return create_async_engine(
        async_url(url or database_url(settings)),
        **pool_options(settings),
        hide_parameters=True,  # as worker.db.build_engine: no parameters in error messages
        connect_args={
            "server_settings": {
                "statement_timeout": str(settings.db_statement_timeout_ms),
                "lock_timeout": str(settings.db_lock_timeout_ms),
                "application_name": "command-worker",
            }
        },
    )


def async_session_factory(engine: AsyncEngine | None = None) -> async_sessionmaker[AsyncSession]:
    """Sessions on `engine` (a new `async_engine()` when omitted) that keep objects after commit."""
    # Reloading an expired attribute would be lazy I/O, which asyncio forbids.
    return async_sessionmaker(bind=engine or async_engine(), expire_on_commit=False)


async def _first(session: AsyncSession, statement: Select[EntityT]) -> EntityT | None:
    result = await session.scalars(_no_lazy_loads(statement))
    return result.first()


async def _all(session: AsyncSession, statement: Select[EntityT]) -> list[EntityT]:
    result = await session.scalars(_no_lazy_loads(statement))
    return list(result)


def _no_lazy_loads(statement: Select[EntityT]) -> Select[EntityT]:
    # A relation the statement does not load eagerly raises a clear error on access instead of
    # attempting lazy I/O (which fails under asyncio with MissingGreenlet).
    return statement.options(raiseload("*"))


async def get_user(session: AsyncSession, user_id: int) -> User | None:
    """The user with `user_id`."""
    return await _first(session, queries.user_by_id(user_id))


async def get_user_by_email(session: AsyncSession, email: str) -> User | None:
    """The user whose email equals `email` without regard to case."""
    return await _first(session, queries.user_by_email(email))


async def get_user_by_username(session: AsyncSession, username: str) -> User | None:
    """The user named `username` (exact match)."""
    return await _first(session, queries.user_by_username(username))


async def list_users(session: AsyncSession, skip: int = 0, limit: int = 100) -> list[User]:
    """Users ordered by id, `limit` of them after the first `skip`."""
    return await _all(session, queries.users_page(skip, limit))


async def get_post(session: AsyncSession, post_id: int) -> Post | None:
    """The post with `post_id`, its author and tags loaded."""
    return await _first(session, queries.post_by_id(post_id))


async def list_posts(session: AsyncSession, skip: int = 0, limit: int = 100) -> list[Post]:
    """Posts ordered by id, with author and tags, `limit` of them after the first `skip`."""
    return await _all(session, queries.posts_page(skip, limit))


async def list_posts_by_author(
    session: AsyncSession, author_id: int, skip: int = 0, limit: int = 100
) -> list[Post]:
    """An author's posts ordered by id, with author and tags."""
    return await _all(session, queries.posts_page(skip, limit, author_id=author_id))


async def get_tag(session: AsyncSession, tag_id: int) -> Tag | None:
    """The tag with `tag_id`."""
    return await _first(session, queries.tag_by_id(tag_id))


async def get_tag_by_name(session: AsyncSession, name: str) -> Tag | None:
    """The tag named `name`."""
    return await _first(session, queries.tag_by_name(name))


async def list_tags(session: AsyncSession, skip: int = 0, limit: int = 100) -> list[Tag]:
    """Tags ordered by id, `limit` of them after the first `skip`."""
    return await _all(session, queries.tags_page(skip, limit))
