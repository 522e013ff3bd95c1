"""The async readers (worker/aio.py) on asyncpg: the same statements and rows as the sync reads."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from worker import aio
from worker.config import Settings
from worker.crud import posts, tags, users
from worker.db import build_engine
from worker.errors import Invalid
from worker.schemas import PostCreate, TagCreate, UserCreate, parse

ResultT = TypeVar("ResultT")
ValueT = TypeVar("ValueT")


@dataclass(frozen=True)
class Stored:
    """The ids of the rows committed for a test."""

    alice: int
    bob: int
    post_ids: list[int]
    tag_ids: list[int]


@pytest.fixture
def stored(clean_database: str) -> Stored:
    """Two users, three posts with tags and a lone tag, committed by a sync session."""
    # The async engine cannot join a sync test transaction: these rows are really committed
    # (clean_database empties the tables again afterwards).
    engine = create_engine(clean_database)
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            alice = users.create(session, parse(UserCreate, {
                "username": "alice", "email": "Alice.Smith@Example.com", "password": "password-a"}))
            bob = users.create(session, parse(UserCreate, {
                "username": "bob", "email": "bob@example.com", "password": "password-b"}))
            created = [
                posts.create(session, parse(PostCreate, {
                    "title": title, "author_id": author.id, "tags": names, "content": "body"}))
                for title, author, names in [
                    ("first", alice, ["python", "sql", "async"]),
                    ("second", bob, ["sql"]),
                    ("third", alice, []),
                ]
            ]
            lone = tags.create(session, parse(TagCreate, {"name": "lonely"}))
            tag_ids = [tag.id for tag in tags.list_(session)]
            assert lone.id in tag_ids
            return Stored(alice.id, bob.id, [post.id for post in created], tag_ids)
    finally:
        engine.dispose()


def present(value: ValueT | None) -> ValueT:
    """`value`, which the test expects to exist."""
    assert value is not None
    return value


def read(database: str, query: Callable[[AsyncSession], Awaitable[ResultT]]) -> ResultT:
    """Run `query` on an AsyncSession in a fresh event loop; the session is closed on return."""

    async def run() -> ResultT:
        engine = aio.async_engine(database)
        try:
            async with aio.async_session_factory(engine)() as session:
                return await query(session)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def read_sync(database: str, query: Callable[[Session], ResultT]) -> ResultT:
    """Run `query` on a sync Session (the CRUD read functions), for comparison."""
    engine = create_engine(database)
    try:
        with Session(engine, expire_on_commit=False) as session:
            return query(session)
    finally:
        engine.dispose()


def test_get_post_loads_author_and_tags_before_the_session_closes(
    clean_database: str, stored: Stored
) -> None:
    post = read(clean_database, lambda session: aio.get_post(session, stored.post_ids[0]))

    # The session is closed: these attribute reads work only because they were loaded eagerly.
    assert post is not None
    assert post.title == "first"
    assert post.author.username == "alice"
    assert [tag.name for tag in post.tags] == ["async", "python", "sql"]


def test_list_posts_loads_every_author_and_tag(clean_database: str, stored: Stored) -> None:
    loaded = read(clean_database, lambda session: aio.list_posts(session))

    assert [(post.title, post.author.username, [tag.name for tag in post.tags])
            for post in loaded] == [
        ("first", "alice", ["async", "python", "sql"]),
        ("second", "bob", ["sql"]),
        ("third", "alice", []),
    ]


def test_async_reads_return_what_the_sync_crud_reads_return(
    clean_database: str, stored: Stored
) -> None:
    async def everything(session: AsyncSession) -> dict[str, Any]:
        return {
            "user": users.to_record(present(await aio.get_user(session, stored.alice))),
            "users": [users.to_record(user) for user in await aio.list_users(session)],
            "post": posts.to_detail(present(await aio.get_post(session, stored.post_ids[1]))),
            "posts": [posts.to_detail(post) for post in await aio.list_posts(session, 1, 5)],
            "by author": [posts.to_record(post)
                          for post in await aio.list_posts_by_author(session, stored.alice)],
            "tag": tags.to_record(present(await aio.get_tag(session, stored.tag_ids[0]))),
            "tags": [tags.to_record(tag) for tag in await aio.list_tags(session)],
        }

    def everything_sync(session: Session) -> dict[str, Any]:
        return {
            "user": users.to_record(present(users.get(session, stored.alice))),
            "users": [users.to_record(user) for user in users.list_(session)],
            "post": posts.to_detail(present(posts.get(session, stored.post_ids[1]))),
            "posts": [posts.to_detail(post) for post in posts.list_(session, 1, 5)],
            "by author": [posts.to_record(post)
                          for post in posts.list_by_author(session, stored.alice)],
            "tag": tags.to_record(present(tags.get(session, stored.tag_ids[0]))),
            "tags": [tags.to_record(tag) for tag in tags.list_(session)],
        }

    from_async = read(clean_database, everything)

    assert from_async == read_sync(clean_database, everything_sync)
    assert [post["title"] for post in from_async["posts"]] == ["second", "third"]
    assert [post["title"] for post in from_async["by author"]] == ["first", "third"]
    assert len(from_async["tags"]) == 4


def test_get_user_by_email_ignores_case_and_by_username_is_exact(
    clean_database: str, stored: Stored
) -> None:
    async def lookups(session: AsyncSession) -> list[int | None]:
        found = [
            await aio.get_user_by_email(session, "alice.smith@example.com"),
            await aio.get_user_by_email(session, "ALICE.SMITH@EXAMPLE.COM"),
            await aio.get_user_by_email(session, "nobody@example.com"),
            await aio.get_user_by_username(session, "bob"),
            await aio.get_user_by_username(session, "Bob"),
        ]
        return [user.id if user is not None else None for user in found]

    assert read(clean_database, lookups) == [stored.alice, stored.alice, None, stored.bob, None]


def test_missing_ids_read_as_none(clean_database: str, stored: Stored) -> None:
    async def missing(session: AsyncSession) -> list[object]:
        return [
            await aio.get_user(session, 999_999),
            await aio.get_post(session, 999_999),
            await aio.get_tag(session, 999_999),
            await aio.get_tag_by_name(session, "no such tag"),
        ]

    assert read(clean_database, missing) == [None, None, None, None]


def test_list_users_pages_in_id_order(clean_database: str, stored: Stored) -> None:
    async def pages(session: AsyncSession) -> list[list[str]]:
        return [
            [user.username for user in await aio.list_users(session, skip, limit)]
            for skip, limit in [(0, 100), (0, 1), (1, 1), (2, 10)]
        ]

    assert read(clean_database, pages) == [["alice", "bob"], ["alice"], ["bob"], []]


@pytest.mark.parametrize("paging", [(0, 0), (0, 1001), (-1, 10)],
                         ids=["limit 0", "limit 1001", "negative skip"])
def test_async_lists_check_their_paging(clean_database: str, paging: tuple[int, int]) -> None:
    skip, limit = paging
    for list_function in (aio.list_users, aio.list_posts, aio.list_tags):

        async def page(session: AsyncSession, list_page: Any = list_function) -> Any:
            return await list_page(session, skip, limit)

        with pytest.raises(Invalid):
            read(clean_database, page)


def test_a_relation_not_loaded_eagerly_raises_instead_of_lazy_loading(
    clean_database: str, stored: Stored
) -> None:
    user = read(clean_database, lambda session: aio.get_user(session, stored.alice))

    assert user is not None
    with pytest.raises(InvalidRequestError, match="lazy='raise'"):
        _ = user.posts


def test_async_engine_uses_asyncpg_with_the_sync_engines_pool_and_timeouts(
    clean_database: str,
) -> None:
    settings = Settings(database_url=clean_database, db_pool_size=3, db_max_overflow=4,
                        db_pool_timeout=7, db_pool_recycle=600, db_statement_timeout_ms=12_345,
                        db_lock_timeout_ms=2_345)

    async def inspect() -> tuple[str, tuple[object, ...], list[str]]:
        engine = aio.async_engine(settings=settings)
        try:
            async with aio.async_session_factory(engine)() as session:
                shown = [
                    str((await session.execute(text(f"SHOW {name}"))).scalar_one())
                    for name in ("statement_timeout", "lock_timeout", "application_name")
                ]
            pool: Any = engine.sync_engine.pool
            return engine.dialect.driver, pool_settings(pool), shown
        finally:
            await engine.dispose()

    driver, async_pool, shown = asyncio.run(inspect())
    sync_engine = build_engine(settings)
    try:
        sync_pool = pool_settings(sync_engine.pool)
    finally:
        sync_engine.dispose()

    assert driver == "asyncpg"
    assert async_pool == sync_pool == (3, 4, 7, 600, True)
    assert shown == ["12345ms", "2345ms", "command-worker"]


def pool_settings(pool: Any) -> tuple[object, ...]:
    """(size, max overflow, timeout, recycle, pre-ping) of a QueuePool."""
    return (pool.size(), pool._max_overflow, pool.timeout(), pool._recycle, pool._pre_ping)


@pytest.mark.parametrize(("given", "expected"), [
    ("postgresql://u:p@db:5432/app", "postgresql+asyncpg://u:p@db:5432/app"),
    ("postgresql+psycopg2://u:p@db/app", "postgresql+asyncpg://u:p@db/app"),
    ("postgresql+psycopg2://u@db/app?sslmode=require", "postgresql+asyncpg://u@db/app?ssl=require"),
])
def test_async_url_names_the_asyncpg_driver(given: str, expected: str) -> None:
    assert aio.async_url(given) == expected
    assert make_url(aio.async_url(given)).password == make_url(given).password
