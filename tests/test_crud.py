"""The CRUD layer against real PostgreSQL: reads, paging, hashing, conflicts, cascades, no N+1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.orm import Session

from worker import security
from worker.crud import posts, tags, users
from worker.errors import Conflict, Invalid, NotFound
from worker.models import Post, Tag, User, post_tags
from worker.schemas import (
    PostCreate,
    PostUpdate,
    TagCreate,
    TagUpdate,
    UserCreate,
    UserUpdate,
    parse,
)


@pytest.fixture(autouse=True)
def empty_tables(db_session: Session) -> None:
    """No rows committed by other tests: deleted inside the test's transaction, so restored."""
    # DELETE, not TRUNCATE: row locks only, so a worker left running by other tests never waits
    # on a whole table. Deleting users cascades to posts; deleting tags, to post_tags.
    db_session.execute(text("DELETE FROM users"))
    db_session.execute(text("DELETE FROM tags"))


def make_user(session: Session, username: str, email: str | None = None,
              plain: str = "correct horse battery") -> User:
    """A user (with the plain-text password `plain`) created through the CRUD layer."""
    data = {"username": username, "email": email or f"{username}@example.com", "password": plain}
    return users.create(session, parse(UserCreate, data))


def make_post(session: Session, author: User, title: str, tag_names: list[str] | None = None,
              content: str | None = None) -> Post:
    """A post created through the CRUD layer, as a command would."""
    data: dict[str, Any] = {"title": title, "author_id": author.id, "tags": tag_names or []}
    if content is not None:
        data["content"] = content
    return posts.create(session, parse(PostCreate, data))


def count(session: Session, sql: str, **params: Any) -> int:
    """The single integer `sql` selects, read in the test's transaction."""
    return int(session.execute(text(sql), params).scalar_one())


# --- users: reads ------------------------------------------------------------------------------


def test_get_returns_the_user_and_none_for_a_missing_id(db_session: Session) -> None:
    alice = make_user(db_session, "alice")
    db_session.expunge_all()

    found = users.get(db_session, alice.id)

    assert found is not None
    assert (found.id, found.username, found.email) == (alice.id, "alice", "alice@example.com")
    assert users.get(db_session, alice.id + 1000) is None


def test_get_by_email_ignores_case(db_session: Session) -> None:
    alice = make_user(db_session, "alice", "Alice.Smith@Example.com")

    spellings = ("alice.smith@example.com", "ALICE.SMITH@EXAMPLE.COM", "Alice.Smith@example.com")
    for spelling in spellings:
        found = users.get_by_email(db_session, spelling)
        assert found is not None and found.id == alice.id, spelling
    assert users.get_by_email(db_session, "bob@example.com") is None


def test_get_by_username_is_an_exact_match(db_session: Session) -> None:
    alice = make_user(db_session, "alice")

    found = users.get_by_username(db_session, "alice")

    assert found is not None and found.id == alice.id
    assert users.get_by_username(db_session, "Alice") is None
    assert users.get_by_username(db_session, "ali") is None


def test_list_pages_users_in_id_order(db_session: Session) -> None:
    created = [make_user(db_session, f"user{n}") for n in range(5)]
    ids = [user.id for user in created]

    assert [user.id for user in users.list_(db_session)] == ids
    assert [user.id for user in users.list_(db_session, skip=1, limit=2)] == ids[1:3]
    assert [user.id for user in users.list_(db_session, skip=4, limit=10)] == ids[4:]
    assert users.list_(db_session, skip=5, limit=10) == []


LISTS: dict[str, Callable[..., list[Any]]] = {
    "users": users.list_,
    "posts": posts.list_,
    "tags": tags.list_,
    "posts by author": lambda session, **paging: posts.list_by_author(session, 1, **paging),
}


@pytest.mark.parametrize("paging", [{"limit": 0}, {"limit": 1001}, {"skip": -1}],
                         ids=["limit 0", "limit 1001", "negative skip"])
@pytest.mark.parametrize("list_function", LISTS.values(), ids=LISTS.keys())
def test_lists_reject_out_of_range_paging(
    db_session: Session, list_function: Callable[..., list[Any]], paging: dict[str, int]
) -> None:
    with pytest.raises(Invalid) as raised:
        list_function(db_session, **paging)
    assert raised.value.reason == "invalid"


@pytest.mark.parametrize("list_function", LISTS.values(), ids=LISTS.keys())
def test_lists_accept_the_page_size_bounds(
    db_session: Session, list_function: Callable[..., list[Any]]
) -> None:
    assert list_function(db_session, skip=0, limit=1) == []
    assert list_function(db_session, skip=0, limit=1000) == []


# --- users: writes -----------------------------------------------------------------------------


def test_create_stores_only_a_salted_hash_of_the_password(db_session: Session) -> None:
    alice = make_user(db_session, "alice", plain="correct horse battery")
    bob = make_user(db_session, "bob", plain="correct horse battery")

    stored = db_session.execute(
        text("SELECT hashed_password FROM users WHERE id = :id"), {"id": alice.id}
    ).scalar_one()
    assert "correct horse battery" not in stored
    assert stored.startswith("$argon2id$")
    assert security.verify_password(stored, "correct horse battery")
    assert not security.verify_password(stored, "wrong horse battery")
    assert bob.hashed_password != stored  # salted: the same password never hashes the same
    assert "hashed_password" not in users.to_record(alice)


def test_create_with_an_email_taken_in_another_case_is_a_conflict(db_session: Session) -> None:
    make_user(db_session, "alice", "alice@example.com")

    with pytest.raises(Conflict) as raised:
        make_user(db_session, "alice2", "ALICE@example.com")

    assert raised.value.detail == "email already registered"
    assert count(db_session, "SELECT count(*) FROM users") == 1


def test_create_with_a_taken_username_is_a_conflict(db_session: Session) -> None:
    make_user(db_session, "alice")

    with pytest.raises(Conflict) as raised:
        make_user(db_session, "alice", "other@example.com")

    assert raised.value.detail == "username already taken"


def test_create_starts_at_version_1(db_session: Session) -> None:
    alice = make_user(db_session, "alice")

    assert alice.version == 1
    assert alice.is_active is True


def test_partial_update_changes_only_the_given_fields_and_bumps_the_version(
    db_session: Session,
) -> None:
    alice = make_user(db_session, "alice", "alice@example.com")
    before = users.to_record(alice)
    hashed_before = alice.hashed_password

    users.update(db_session, alice, parse(UserUpdate, {"is_active": False}))
    db_session.expire_all()
    after = users.get(db_session, alice.id)

    assert after is not None
    assert after.is_active is False
    assert (after.username, after.email) == (before["username"], before["email"])
    assert after.hashed_password == hashed_before
    assert after.version == 2


def test_updating_the_password_stores_a_new_hash(db_session: Session) -> None:
    alice = make_user(db_session, "alice", plain="first password")

    users.update(db_session, alice, parse(UserUpdate, {"password": "second password"}))

    assert security.verify_password(alice.hashed_password, "second password")
    assert not security.verify_password(alice.hashed_password, "first password")
    assert alice.username == "alice"
    assert alice.version == 2


def test_updating_to_an_email_another_user_has_is_a_conflict(db_session: Session) -> None:
    make_user(db_session, "alice", "alice@example.com")
    bob = make_user(db_session, "bob", "bob@example.com")

    with pytest.raises(Conflict):
        users.update(db_session, bob, parse(UserUpdate, {"email": "Alice@example.com"}))
    # Changing only the case of one's own email is not a conflict.
    users.update(db_session, bob, parse(UserUpdate, {"email": "BOB@example.com"}))
    assert bob.email == "BOB@example.com"


# --- posts and tags ----------------------------------------------------------------------------


def tag_names_of(post: Post) -> list[str]:
    """The names of `post`'s tags, in the relationship's order (by name)."""
    return [tag.name for tag in post.tags]


def test_create_post_reuses_existing_tags_creates_missing_ones_and_collapses_duplicates(
    db_session: Session,
) -> None:
    alice = make_user(db_session, "alice")
    python = tags.create(db_session, parse(TagCreate, {"name": "python"}))

    post = make_post(db_session, alice, "Hello", ["sql", "python", "sql", "python", "orm"])

    assert sorted(tag_names_of(post)) == ["orm", "python", "sql"]
    assert next(tag for tag in post.tags if tag.name == "python").id == python.id
    assert count(db_session, "SELECT count(*) FROM tags") == 3
    assert count(db_session, "SELECT count(*) FROM post_tags WHERE post_id = :id", id=post.id) == 3
    assert posts.to_record(post)["tags"] == ["orm", "python", "sql"]


def test_create_post_for_a_missing_author_is_not_found(db_session: Session) -> None:
    with pytest.raises(NotFound):
        posts.create(db_session, parse(PostCreate, {"title": "Orphan", "author_id": 999_999}))
    assert count(db_session, "SELECT count(*) FROM posts") == 0


def test_get_post_loads_its_author_and_tags(db_session: Session) -> None:
    alice = make_user(db_session, "alice")
    post = make_post(db_session, alice, "Hello", ["b", "a"], content="body")
    db_session.expunge_all()

    found = posts.get(db_session, post.id)

    assert found is not None
    assert found.author.username == "alice"
    assert tag_names_of(found) == ["a", "b"]
    assert posts.to_detail(found)["author"]["id"] == alice.id
    assert posts.get(db_session, post.id + 1000) is None


def test_list_posts_by_author_pages_only_that_authors_posts(db_session: Session) -> None:
    alice, bob = make_user(db_session, "alice"), make_user(db_session, "bob")
    mine = [make_post(db_session, alice, f"a{n}").id for n in range(3)]
    make_post(db_session, bob, "b0")

    assert [post.id for post in posts.list_by_author(db_session, alice.id)] == mine
    assert [post.id for post in posts.list_by_author(db_session, alice.id, 1, 1)] == mine[1:2]
    assert [post.title for post in posts.list_(db_session)] == ["a0", "a1", "a2", "b0"]


def test_updating_tags_replaces_the_set(db_session: Session) -> None:
    alice = make_user(db_session, "alice")
    post = make_post(db_session, alice, "Hello", ["a", "b"], content="body")

    posts.update(db_session, post, parse(PostUpdate, {"tags": ["b", "c", "c"]}))
    db_session.expire_all()
    stored = posts.get(db_session, post.id)

    assert stored is not None
    assert tag_names_of(stored) == ["b", "c"]
    assert (stored.title, stored.content, stored.version) == ("Hello", "body", 2)
    linked = db_session.execute(
        select(Tag.name).join(post_tags).where(post_tags.c.post_id == post.id).order_by(Tag.name)
    ).scalars().all()
    assert linked == ["b", "c"]
    assert tags.get_by_name(db_session, "a") is not None  # an unlinked tag is kept


def test_a_post_update_without_tags_keeps_them_and_null_content_clears_it(
    db_session: Session,
) -> None:
    alice = make_user(db_session, "alice")
    post = make_post(db_session, alice, "Hello", ["a"], content="body")

    posts.update(db_session, post, parse(PostUpdate, {"title": "Bye", "content": None}))

    assert (post.title, post.content, tag_names_of(post), post.version) == ("Bye", None, ["a"], 2)


def test_tag_names_are_unique_on_create_and_rename(db_session: Session) -> None:
    first = tags.create(db_session, parse(TagCreate, {"name": "first"}))
    second = tags.create(db_session, parse(TagCreate, {"name": "second"}))

    with pytest.raises(Conflict):
        tags.create(db_session, parse(TagCreate, {"name": "first"}))
    with pytest.raises(Conflict):
        tags.update(db_session, second, parse(TagUpdate, {"name": "first"}))
    tags.update(db_session, first, parse(TagUpdate, {"name": "renamed"}))

    assert (first.name, first.version) == ("renamed", 2)
    found = tags.get(db_session, first.id)
    assert found is not None and found.name == "renamed"
    assert tags.get_by_name(db_session, "first") is None
    assert [tag.name for tag in tags.list_(db_session)] == ["renamed", "second"]


# --- deletes cascade ---------------------------------------------------------------------------


def test_deleting_a_user_deletes_their_posts_and_those_posts_tag_links(db_session: Session) -> None:
    alice, bob = make_user(db_session, "alice"), make_user(db_session, "bob")
    for n in range(2):
        make_post(db_session, alice, f"a{n}", ["shared", f"only-a{n}"])
    kept = make_post(db_session, bob, "b", ["shared"])

    users.delete(db_session, alice)

    assert users.get(db_session, alice.id) is None
    assert count(db_session, "SELECT count(*) FROM posts WHERE author_id = :id", id=alice.id) == 0
    assert count(db_session, "SELECT count(*) FROM post_tags") == 1
    assert count(db_session, "SELECT count(*) FROM post_tags WHERE post_id = :id", id=kept.id) == 1
    assert count(db_session, "SELECT count(*) FROM tags") == 3  # tags outlive their posts


def test_deleting_a_tag_removes_its_links_but_not_the_posts(db_session: Session) -> None:
    alice = make_user(db_session, "alice")
    post = make_post(db_session, alice, "Hello", ["doomed", "kept"])
    doomed = tags.get_by_name(db_session, "doomed")
    assert doomed is not None

    tags.delete(db_session, doomed)
    db_session.expire_all()

    stored = posts.get(db_session, post.id)
    assert stored is not None
    assert tag_names_of(stored) == ["kept"]
    assert count(db_session, "SELECT count(*) FROM post_tags WHERE tag_id = :id", id=doomed.id) == 0


def test_deleting_a_post_removes_its_tag_links_but_not_the_tags(db_session: Session) -> None:
    alice = make_user(db_session, "alice")
    post = make_post(db_session, alice, "Hello", ["a", "b"])

    posts.delete(db_session, post)

    assert posts.get(db_session, post.id) is None
    assert count(db_session, "SELECT count(*) FROM post_tags") == 0
    assert count(db_session, "SELECT count(*) FROM tags") == 2
    assert users.get(db_session, alice.id) is not None


# --- no N+1 ------------------------------------------------------------------------------------


class StatementCounter:
    """Counts the SQL statements sent on one connection while it is listening."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, *args: Any) -> None:
        # before_cursor_execute(conn, cursor, statement, parameters, context, executemany)
        self.statements.append(args[2])


@pytest.fixture
def statements(db_session: Session) -> Iterator[StatementCounter]:
    """Every SQL statement the test's session sends from now on."""
    connection = db_session.connection()
    counter = StatementCounter()
    event.listen(connection, "before_cursor_execute", counter)
    yield counter
    event.remove(connection, "before_cursor_execute", counter)


def twenty_posts_with_authors_and_three_tags(session: Session) -> None:
    """20 posts by 10 authors, each post with 3 of 6 tags; then an empty identity map."""
    authors = [make_user(session, f"author{n}") for n in range(10)]
    names = [f"tag{n}" for n in range(6)]
    for n in range(20):
        make_post(session, authors[n % 10], f"post {n}", [names[(n + k) % 6] for k in range(3)])
    session.expunge_all()


def touch_authors_and_tags(loaded: list[Post]) -> list[tuple[str, list[str]]]:
    """Read every post's author and tag names (what an N+1 would load one by one)."""
    return [(post.author.username, tag_names_of(post)) for post in loaded]


def test_listing_posts_with_authors_and_tags_takes_a_constant_number_of_statements(
    db_session: Session, statements: StatementCounter
) -> None:
    twenty_posts_with_authors_and_three_tags(db_session)
    statements.statements.clear()

    loaded = posts.list_(db_session, limit=20)
    touched = touch_authors_and_tags(loaded)

    assert len(loaded) == 20
    assert all(len(tag_list) == 3 for _, tag_list in touched)
    assert 2 <= len(statements.statements) <= 3, statements.statements


def test_the_statement_counter_sees_the_n_plus_1_of_a_lazy_query(
    db_session: Session, statements: StatementCounter
) -> None:
    # The instrument itself: without eager loading the same reads cost a statement per relation.
    twenty_posts_with_authors_and_three_tags(db_session)
    statements.statements.clear()

    loaded = list(db_session.scalars(select(Post).order_by(Post.id).limit(20)))
    touch_authors_and_tags(loaded)

    assert len(statements.statements) > 20


def test_listing_users_and_tags_is_one_statement(
    db_session: Session, statements: StatementCounter
) -> None:
    twenty_posts_with_authors_and_three_tags(db_session)
    statements.statements.clear()

    assert len(users.list_(db_session)) == 10
    assert len(tags.list_(db_session)) == 6
    assert len(statements.statements) == 2
    assert db_session.scalar(select(func.count()).select_from(User)) == 10
