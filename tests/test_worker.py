"""Every command of the contract through a real worker process, published as any producer would."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import create_engine, text

from tests.conftest import WorkerProcess

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-Pa55word!"


class Outcome:
    """A command's stored outcome, read raw from the result backend (as a non-Python client)."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.status: str = meta["status"]
        self.result: Any = meta["result"]

    @property
    def reason(self) -> str:
        """The rejection's reason: the first word of the error message."""
        assert self.status == "FAILURE", self.meta
        message = self.result["exc_message"]
        message = message[0] if isinstance(message, list) else message
        return str(message).split(":", 1)[0]


class Commands:
    """Publishes commands with `send_task` and waits for their outcome."""

    def __init__(self, producer: Celery, broker_url: str) -> None:
        self.producer = producer
        self.redis = redis.Redis.from_url(broker_url)

    def publish(self, task: str, **kwargs: Any) -> str:
        """Send `task` with keyword arguments; the task id."""
        return str(self.producer.send_task(task, kwargs=kwargs, queue="commands").id)

    def wait(self, task_id: str, timeout: float = 30) -> Outcome:
        """The task's stored outcome, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = self.redis.get(f"celery-task-meta-{task_id}")
            if raw is not None:
                meta = json.loads(raw)
                if meta["status"] in ("SUCCESS", "FAILURE"):
                    return Outcome(meta)
            time.sleep(0.02)
        raise AssertionError(f"no outcome for {task_id} in {timeout} s")

    def run(self, task: str, **kwargs: Any) -> Outcome:
        """Send and wait."""
        return self.wait(self.publish(task, **kwargs))

    def applied(self, task: str, **kwargs: Any) -> dict[str, Any]:
        """Send, wait, and require the outcome `applied`; the result."""
        outcome = self.run(task, **kwargs)
        assert outcome.status == "SUCCESS", outcome.meta
        assert outcome.result["outcome"] == "applied", outcome.result
        return dict(outcome.result)


@pytest.fixture
def commands(producer: Celery, broker_url: str, worker_process: WorkerProcess,
             clean_database: str) -> Commands:
    return Commands(producer, broker_url)


def rows(database_url: str, sql: str, **params: Any) -> list[Any]:
    engine = create_engine(database_url)
    with engine.connect() as connection:
        found = list(connection.execute(text(sql), params))
    engine.dispose()
    return found


def dead_letters(database_url: str) -> list[Any]:
    return rows(database_url, "SELECT command_id, task, reason, error, kwargs FROM dead_letters "
                              "ORDER BY id")


def new_user(commands: Commands, name: str = "alice", **command: Any) -> dict[str, Any]:
    data = {"username": name, "email": f"{name}@example.com", "password": PASSWORD}
    return commands.applied("users.create", data=data, **command)


def test_users_create_applies_and_returns_the_record_without_secrets(
    commands: Commands, clean_database: str
) -> None:
    result = new_user(commands, command_id="create-alice")
    assert result["command_id"] == "create-alice"
    assert result["entity"] == "user"
    data = result["data"]
    assert data["username"] == "alice" and data["email"] == "alice@example.com"
    assert data["is_active"] is True and data["version"] == 1 and data["id"] == result["id"]
    assert "password" not in json.dumps(result) and "hashed" not in json.dumps(result)
    (stored,) = rows(clean_database, "SELECT hashed_password FROM users")
    assert stored.hashed_password.startswith("$argon2id$")
    assert PASSWORD not in stored.hashed_password


def test_a_command_sent_twice_is_applied_once_and_the_second_is_a_duplicate(
    commands: Commands, clean_database: str
) -> None:
    first = new_user(commands, command_id="same-key")
    second = commands.run("users.create", command_id="same-key", data={
        "username": "alice", "email": "alice@example.com", "password": PASSWORD})
    assert second.status == "SUCCESS"
    assert second.result == {**first, "outcome": "duplicate"}
    assert len(rows(clean_database, "SELECT id FROM users")) == 1


def test_the_same_command_id_sent_twenty_times_at_once_has_one_effect(
    commands: Commands, clean_database: str
) -> None:
    author = new_user(commands)
    kwargs = {"command_id": "post-once",
              "data": {"title": "once", "author_id": author["id"], "tags": ["x"]}}
    with ThreadPoolExecutor(10) as pool:
        task_ids = list(pool.map(lambda _: commands.publish("posts.create", **kwargs), range(20)))
    outcomes = [commands.wait(task_id) for task_id in task_ids]
    assert all(outcome.status == "SUCCESS" for outcome in outcomes)
    kinds = sorted(outcome.result["outcome"] for outcome in outcomes)
    assert kinds == ["applied"] + ["duplicate"] * 19
    assert len({outcome.result["id"] for outcome in outcomes}) == 1
    assert len(rows(clean_database, "SELECT id FROM posts")) == 1
    assert not dead_letters(clean_database)


def test_without_a_command_id_the_task_id_is_the_key(commands: Commands) -> None:
    task_id = str(uuid.uuid4())
    data = {"name": "keyed-by-task-id"}
    commands.producer.send_task("tags.create", kwargs={"data": data}, task_id=task_id,
                                queue="commands")
    outcome = commands.wait(task_id)
    assert outcome.result["command_id"] == task_id
    assert outcome.result["outcome"] == "applied"


def test_an_email_taken_in_another_case_is_a_conflict_with_a_dead_letter(
    commands: Commands, clean_database: str
) -> None:
    new_user(commands, "alice")
    outcome = commands.run("users.create", command_id="bob-1", data={
        "username": "bob", "email": "ALICE@Example.com", "password": PASSWORD})
    assert outcome.status == "FAILURE"
    assert outcome.reason == "conflict"
    assert "email already registered" in str(outcome.result["exc_message"])
    (letter,) = dead_letters(clean_database)
    assert (letter.command_id, letter.task, letter.reason) == ("bob-1", "users.create", "conflict")
    # The dead letter keeps what a replay needs: the password only as its hash, in its own
    # column.
    assert letter.kwargs["data"]["password"] == "[redacted]"
    assert "password_hash" not in letter.kwargs["data"] and PASSWORD not in str(letter.kwargs)
    ((hashed,),) = rows(clean_database, "SELECT password_hash FROM dead_letters")
    assert hashed.startswith("$argon2id$")
    assert len(rows(clean_database, "SELECT id FROM users")) == 1


def test_a_taken_username_is_a_conflict(commands: Commands) -> None:
    new_user(commands, "alice")
    outcome = commands.run("users.create", data={
        "username": "alice", "email": "other@example.com", "password": PASSWORD})
    assert outcome.reason == "conflict"


@pytest.mark.parametrize(
    ("task", "kwargs"),
    [
        ("users.update", {"id": 4242, "data": {"is_active": False}}),
        ("users.delete", {"id": 4242}),
        ("posts.update", {"id": 4242, "data": {"title": "t"}}),
        ("posts.delete", {"id": 4242}),
        ("tags.update", {"id": 4242, "data": {"name": "n"}}),
        ("tags.delete", {"id": 4242}),
        ("posts.create", {"data": {"title": "t", "author_id": 4242}}),
    ],
)
def test_a_missing_id_is_not_found(commands: Commands, clean_database: str, task: str,
                                   kwargs: dict[str, Any]) -> None:
    outcome = commands.run(task, **kwargs)
    assert outcome.status == "FAILURE"
    assert outcome.reason == "not_found"
    (letter,) = dead_letters(clean_database)
    assert letter.reason == "not_found" and letter.task == task


def test_an_update_changes_only_the_fields_given_and_bumps_the_version(
    commands: Commands, clean_database: str
) -> None:
    created = new_user(commands)["data"]
    time.sleep(0.01)
    updated = commands.applied("users.update", id=created["id"], data={"is_active": False})
    data = updated["data"]
    assert data["is_active"] is False
    assert data["version"] == 2
    assert {k: data[k] for k in ("username", "email", "created_at")} == {
        k: created[k] for k in ("username", "email", "created_at")}
    assert data["updated_at"] > created["updated_at"]
    (stored,) = rows(clean_database, "SELECT hashed_password, version FROM users")
    assert stored.version == 2


def test_a_password_update_is_rehashed(commands: Commands, clean_database: str) -> None:
    from worker.security import verify_password

    created = new_user(commands)
    commands.applied("users.update", id=created["id"], data={"password": "a-new-password"})
    (stored,) = rows(clean_database, "SELECT hashed_password FROM users")
    assert verify_password(stored.hashed_password, "a-new-password")
    assert not verify_password(stored.hashed_password, PASSWORD)


def test_a_stale_expected_version_is_rejected_and_changes_nothing(
    commands: Commands, clean_database: str
) -> None:
    tag = commands.applied("tags.create", data={"name": "old"})
    commands.applied("tags.update", id=tag["id"], data={"name": "new"}, expected_version=1)
    stale = commands.run("tags.update", id=tag["id"], data={"name": "newer"}, expected_version=1)
    assert stale.reason == "stale"
    stale_delete = commands.run("tags.delete", id=tag["id"], expected_version=1)
    assert stale_delete.reason == "stale"
    (stored,) = rows(clean_database, "SELECT name, version FROM tags")
    assert (stored.name, stored.version) == ("new", 2)
    deleted = commands.applied("tags.delete", id=tag["id"], expected_version=2)
    assert deleted["data"]["name"] == "new"


def test_posts_with_tags_create_update_replace_and_delete(
    commands: Commands, clean_database: str
) -> None:
    author = new_user(commands)
    existing = commands.applied("tags.create", data={"name": "python"})
    post = commands.applied("posts.create", data={
        "title": "Hello", "content": "body", "author_id": author["id"],
        "tags": ["python", "celery", "celery"]})
    assert post["data"]["tags"] == ["celery", "python"]
    assert post["data"]["author_id"] == author["id"]
    tag_ids = {r.name: r.id for r in rows(clean_database, "SELECT id, name FROM tags")}
    assert tag_ids["python"] == existing["id"]

    updated = commands.applied("posts.update", id=post["id"], data={"tags": ["redis"]})
    assert updated["data"]["tags"] == ["redis"]
    assert updated["data"]["title"] == "Hello" and updated["data"]["content"] == "body"
    assert updated["data"]["version"] == 2
    links = rows(clean_database, "SELECT t.name FROM post_tags pt JOIN tags t ON t.id = pt.tag_id")
    assert [link.name for link in links] == ["redis"]

    deleted = commands.applied("posts.delete", id=post["id"])
    assert deleted["data"]["title"] == "Hello"
    assert not rows(clean_database, "SELECT * FROM post_tags")
    assert len(rows(clean_database, "SELECT * FROM tags")) == 3


def test_deleting_a_user_cascades_to_posts_and_their_tag_links(
    commands: Commands, clean_database: str
) -> None:
    alice, bob = new_user(commands, "alice"), new_user(commands, "bob")
    for author in (alice, alice, bob):
        commands.applied("posts.create", data={"title": "t", "author_id": author["id"],
                                               "tags": ["shared"]})
    deleted = commands.applied("users.delete", id=alice["id"])
    assert deleted["data"]["username"] == "alice"
    remaining = rows(clean_database, "SELECT author_id FROM posts")
    assert [r.author_id for r in remaining] == [bob["id"]]
    assert len(rows(clean_database, "SELECT * FROM post_tags")) == 1
    assert len(rows(clean_database, "SELECT * FROM tags")) == 1


def test_deleting_a_tag_removes_its_links_but_not_the_posts(
    commands: Commands, clean_database: str
) -> None:
    author = new_user(commands)
    post = commands.applied("posts.create", data={"title": "t", "author_id": author["id"],
                                                  "tags": ["a", "b"]})
    tag_a = rows(clean_database, "SELECT id FROM tags WHERE name = 'a'")[0].id
    commands.applied("tags.delete", id=tag_a)
    assert len(rows(clean_database, "SELECT * FROM posts")) == 1
    links = rows(clean_database, "SELECT tag_id FROM post_tags WHERE post_id = :p", p=post["id"])
    assert len(links) == 1 and links[0].tag_id != tag_a


def test_a_tag_rename_to_a_taken_name_is_a_conflict(commands: Commands) -> None:
    commands.applied("tags.create", data={"name": "a"})
    b = commands.applied("tags.create", data={"name": "b"})
    assert commands.run("tags.update", id=b["id"], data={"name": "a"}).reason == "conflict"
    assert commands.run("tags.create", data={"name": "a"}).reason == "conflict"


@pytest.mark.parametrize(
    ("task", "kwargs"),
    [
        ("users.create", {"data": {"username": "x", "email": "x@y.z", "password": "short"}}),
        ("users.create", {"data": {"username": "x", "email": "x@y.zz", "password": PASSWORD,
                                   "admin": True}}),
        ("users.create", {"data": "not an object"}),
        ("users.update", {"id": "1", "data": {"is_active": True}}),
        ("posts.create", {"data": {"title": "nul\x00", "author_id": 1}}),
        ("tags.create", {"data": {"name": "x" * 10_000}}),
        ("tags.create", {"data": {"name": "ok"}, "command_id": ""}),
    ],
)
def test_invalid_input_is_rejected_with_a_dead_letter_and_the_worker_keeps_going(
    commands: Commands, clean_database: str, task: str, kwargs: dict[str, Any]
) -> None:
    outcome = commands.run(task, **kwargs)
    assert outcome.status == "FAILURE"
    assert outcome.reason == "invalid"
    (letter,) = dead_letters(clean_database)
    assert letter.reason == "invalid"
    commands.applied("tags.create", data={"name": "after"})


def test_positional_arguments_are_invalid(commands: Commands, clean_database: str) -> None:
    task_id = str(commands.producer.send_task("tags.create", args=[{"name": "x"}],
                                              queue="commands").id)
    outcome = commands.wait(task_id)
    assert outcome.reason == "invalid"
    assert "keyword arguments" in str(outcome.result["exc_message"])
    assert dead_letters(clean_database)[0].command_id == task_id


def test_no_password_reaches_results_dead_letters_or_the_worker_log(
    commands: Commands, clean_database: str, worker_process: WorkerProcess, broker_url: str
) -> None:
    secret = "never-ever-log-this-9f8e7d"
    user = commands.applied("users.create", data={
        "username": "secretive", "email": "s@example.com", "password": secret})
    commands.applied("users.update", id=user["id"], data={"password": secret + "2"})
    conflict = commands.run("users.create", data={
        "username": "secretive", "email": "t@example.com", "password": secret})
    assert conflict.reason == "conflict"
    invalid = commands.run("users.create", data={
        "username": "", "email": "t@example.com", "password": secret})
    assert invalid.reason == "invalid"
    time.sleep(0.5)  # let the log handlers flush
    assert secret not in worker_process.log_text()
    stored = json.dumps([list(r) for r in rows(clean_database, "SELECT * FROM dead_letters")],
                        default=str)
    assert secret not in stored
    everything = redis.Redis.from_url(broker_url)
    for key in everything.scan_iter("celery-task-meta-*"):
        assert secret.encode() not in (everything.get(key) or b"")
