"""The apply engine on batches: set-based writes keep every per-command rule."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import scalar
from worker import apply
from worker.security import verify_password

PASSWORD = "correct horse battery"


def command(task: str, **kwargs: Any) -> apply.Command:
    return apply.Command(task=task, task_id=str(uuid.uuid4()), kwargs=kwargs)


def run(*commands: apply.Command) -> list[apply.Command]:
    apply.run_batch(list(commands))
    return list(commands)


def outcome(cmd: apply.Command) -> str:
    if cmd.rejection is not None:
        return cmd.rejection.reason
    assert cmd.result is not None
    return str(cmd.result["outcome"])


@pytest.fixture
def author(clean_database: str) -> int:
    (created,) = run(command("users.create", data={
        "username": "author", "email": "author@example.com", "password": PASSWORD}))
    assert created.result is not None
    return int(created.result["id"])


def test_a_batch_of_creates_is_applied_in_order_with_ids_matching_commands(
    clean_database: str, author: int
) -> None:
    posts = [command("posts.create", data={"title": f"post {i}", "author_id": author,
                                           "tags": [f"t{i % 3}"]}) for i in range(50)]
    run(*posts)
    assert [outcome(p) for p in posts] == ["applied"] * 50
    for i, post in enumerate(posts):
        assert post.result is not None
        assert post.result["data"]["title"] == f"post {i}"
        assert post.result["data"]["tags"] == [f"t{i % 3}"]
    assert scalar(clean_database, "SELECT count(*) FROM posts") == 50
    assert scalar(clean_database, "SELECT count(*) FROM tags") == 3
    assert scalar(clean_database, "SELECT count(*) FROM command_ledger") == 51


def test_one_bad_command_does_not_poison_its_batch(clean_database: str, author: int) -> None:
    batch = run(
        command("tags.create", data={"name": "a"}),
        command("tags.create", data={"name": ""}),
        command("tags.create", data={"name": "a"}),
        command("posts.create", data={"title": "x", "author_id": 999}),
        command("tags.update", id=999, data={"name": "z"}),
        command("tags.create", data={"name": "b"}),
    )
    assert [outcome(c) for c in batch] == [
        "applied", "invalid", "conflict", "not_found", "not_found", "applied"]
    assert scalar(clean_database, "SELECT count(*) FROM dead_letters") == 4
    # A rejection leaves no ledger entry behind.
    assert scalar(clean_database, "SELECT count(*) FROM command_ledger") == 3


def test_the_same_key_twice_in_one_batch_is_applied_then_duplicate(
    clean_database: str, author: int
) -> None:
    first = command("tags.create", data={"name": "once"}, command_id="k")
    second = command("tags.create", data={"name": "once"}, command_id="k")
    run(first, second)
    assert outcome(first) == "applied" and outcome(second) == "duplicate"
    assert second.result == {**(first.result or {}), "outcome": "duplicate"}


def test_a_key_applied_in_an_earlier_batch_is_a_duplicate_and_the_rest_apply_once(
    clean_database: str, author: int
) -> None:
    (first,) = run(command("tags.create", data={"name": "old"}, command_id="old-key"))
    # The fast path inserts every key last: this batch fails on "old-key" and runs again,
    # claiming first. Its re-sent command would now be a conflict: it must be a duplicate.
    batch = run(command("tags.create", data={"name": "new1"}),
                command("tags.create", data={"name": "old"}, command_id="old-key"),
                command("posts.create", data={"title": "p", "author_id": author,
                                              "tags": ["new2"]}))
    assert [outcome(c) for c in batch] == ["applied", "duplicate", "applied"]
    assert batch[1].result == {**(first.result or {}), "outcome": "duplicate"}
    assert scalar(clean_database, "SELECT count(*) FROM tags") == 3
    assert scalar(clean_database, "SELECT count(*) FROM posts") == 1
    assert scalar(clean_database, "SELECT count(*) FROM dead_letters") == 0


def test_a_rejected_command_whose_key_was_applied_before_is_a_duplicate(
    clean_database: str, author: int
) -> None:
    (first,) = run(command("posts.create", data={"title": "p", "author_id": author},
                           command_id="post-key"))
    assert first.result is not None
    run(command("posts.delete", id=first.result["id"]))
    # Applied again, this would be a conflict-free insert; sent with a missing author it
    # would be not_found. Either way the key was applied: a duplicate, no dead letter.
    (again,) = run(command("posts.create", data={"title": "p", "author_id": 999},
                           command_id="post-key"))
    assert outcome(again) == "duplicate"
    assert scalar(clean_database, "SELECT count(*) FROM dead_letters") == 0


def test_a_key_being_applied_by_another_transaction_waits_for_it_then_is_a_duplicate(
    clean_database: str, author: int
) -> None:
    import threading

    import psycopg2

    other = psycopg2.connect(clean_database.replace("postgresql+psycopg2", "postgresql"))
    with other.cursor() as cursor:
        cursor.execute("INSERT INTO command_ledger (command_id, task, result) "
                       "VALUES ('busy-key', 'tags.create', '{\"id\": 7}')")
    late = command("tags.create", data={"name": "late"}, command_id="busy-key")
    worker = threading.Thread(target=run, args=(late,))
    worker.start()
    worker.join(1.0)
    assert worker.is_alive(), "the batch did not wait for the open transaction"
    other.commit()
    other.close()
    worker.join(30)
    assert outcome(late) == "duplicate"
    assert late.result == {"id": 7, "outcome": "duplicate"}
    assert scalar(clean_database, "SELECT count(*) FROM tags") == 0


def test_updates_of_one_row_in_one_batch_apply_in_order(
    clean_database: str, author: int
) -> None:
    batch = run(*[command("users.update", id=author, data={"username": f"name{i}"},
                          expected_version=i + 1) for i in range(5)])
    assert [outcome(c) for c in batch] == ["applied"] * 5
    assert batch[-1].result is not None
    assert batch[-1].result["data"]["version"] == 6
    assert scalar(clean_database, "SELECT username FROM users") == "name4"


def test_update_then_delete_then_update_in_one_batch(clean_database: str, author: int) -> None:
    (post,) = run(command("posts.create", data={"title": "t", "author_id": author,
                                                "tags": ["a"]}))
    assert post.result is not None
    post_id = post.result["id"]
    batch = run(
        command("posts.update", id=post_id, data={"content": "c", "tags": ["b", "c"]}),
        command("posts.delete", id=post_id),
        command("posts.update", id=post_id, data={"title": "late"}),
    )
    assert [outcome(c) for c in batch] == ["applied", "applied", "not_found"]
    assert batch[0].result is not None and batch[1].result is not None
    assert batch[0].result["data"]["tags"] == ["b", "c"]
    assert batch[1].result["data"]["content"] == "c"


def test_users_swapping_emails_in_one_batch_conflict_safely(
    clean_database: str, author: int
) -> None:
    (other,) = run(command("users.create", data={
        "username": "other", "email": "other@example.com", "password": PASSWORD}))
    assert other.result is not None
    batch = run(
        command("users.update", id=author, data={"email": "OTHER@example.com"}),
        command("users.update", id=other.result["id"], data={"email": "x@example.com"}),
    )
    assert [outcome(c) for c in batch] == ["conflict", "applied"]


def test_a_password_in_a_batch_is_hashed_and_its_dead_letter_keeps_only_the_hash(
    clean_database: str, author: int
) -> None:
    (clash,) = run(command("users.create", data={
        "username": "author", "email": "new@example.com", "password": PASSWORD}))
    assert outcome(clash) == "conflict"
    kwargs = scalar(clean_database, "SELECT kwargs FROM dead_letters")
    assert kwargs["data"]["password"] == "[redacted]" and "password_hash" not in kwargs["data"]
    assert PASSWORD not in str(kwargs)
    hashed = scalar(clean_database, "SELECT password_hash FROM dead_letters")
    assert verify_password(hashed, PASSWORD)


def test_a_race_the_checks_cannot_see_falls_back_to_one_by_one(
    clean_database: str, author: int
) -> None:
    # A unique index the write layer does not check stands in for a concurrent insert.
    engine = create_engine(clean_database)
    with engine.begin() as connection:
        connection.execute(text("CREATE UNIQUE INDEX race ON posts (title)"))
    try:
        batch = run(
            command("posts.create", data={"title": "same", "author_id": author}),
            command("posts.create", data={"title": "same", "author_id": author}),
            command("posts.create", data={"title": "other", "author_id": author}),
        )
        assert [outcome(c) for c in batch] == ["applied", "conflict", "applied"]
        assert scalar(clean_database, "SELECT count(*) FROM posts") == 2
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP INDEX race"))
        engine.dispose()


def random_commands(seed: int, count: int) -> list[tuple[str, dict[str, Any]]]:
    """Commands over a few names and ids, so that many of them interact."""
    import random

    chooser = random.Random(seed)
    names = [f"n{i}" for i in range(5)]
    made: list[tuple[str, dict[str, Any]]] = []
    for _ in range(count):
        kind = chooser.choice(["users.create", "users.update", "users.delete", "posts.create",
                               "posts.update", "posts.delete", "tags.create", "tags.update",
                               "tags.delete"])
        some_id = chooser.randint(1, 8)
        tags = chooser.sample(names, chooser.randint(0, 2))
        if kind == "users.create":
            name = chooser.choice(names)
            made.append((kind, {"data": {"username": name, "email": f"{name}@x.io",
                                         "password": PASSWORD}}))
        elif kind == "users.update":
            made.append((kind, {"id": some_id, "data": {"email": f"{chooser.choice(names)}@x.io"}}))
        elif kind == "posts.create":
            made.append((kind, {"data": {"title": "t", "author_id": some_id, "tags": tags}}))
        elif kind == "posts.update":
            made.append((kind, {"id": some_id, "data": {"tags": tags, "title": "u"}}))
        elif kind == "tags.create":
            made.append((kind, {"data": {"name": chooser.choice(names)}}))
        elif kind == "tags.update":
            made.append((kind, {"id": some_id, "data": {"name": chooser.choice(names)}}))
        else:
            made.append((kind, {"id": some_id}))
    return made


def timeless(cmd: apply.Command) -> dict[str, Any] | None:
    if cmd.result is None:
        return None
    return {k: v for k, v in cmd.result["data"].items() if not k.endswith("_at")}


def snapshot(url: str) -> dict[str, list[Any]]:
    engine = create_engine(url)
    with engine.connect() as connection:
        state = {
            "users": [tuple(r) for r in connection.execute(text(
                "SELECT id, username, email, version FROM users ORDER BY id"))],
            "posts": [tuple(r) for r in connection.execute(text(
                "SELECT id, title, author_id, version FROM posts ORDER BY id"))],
            "tags": [tuple(r) for r in connection.execute(text(
                "SELECT id, name, version FROM tags ORDER BY id"))],
            "links": [tuple(r) for r in connection.execute(text(
                "SELECT post_id, tag_id FROM post_tags ORDER BY 1, 2"))],
        }
    engine.dispose()
    return state


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_batch_has_the_outcomes_of_applying_its_commands_one_by_one(
    clean_database: str, seed: int
) -> None:
    """Grouping and reordering inside a batch never changes what happens."""
    from tests.conftest import truncate_all

    made = random_commands(seed, 150)
    one_by_one = [command(task, **kwargs) for task, kwargs in made]
    for each in one_by_one:
        run(each)
    expected = snapshot(clean_database)
    truncate_all(clean_database)

    batched = [command(task, **kwargs) for task, kwargs in made]
    for start in range(0, len(batched), 50):
        run(*batched[start:start + 50])
    assert [outcome(c) for c in batched] == [outcome(c) for c in one_by_one]
    assert [timeless(c) for c in batched] == [timeless(c) for c in one_by_one]
    assert snapshot(clean_database) == expected


@pytest.mark.parametrize("task_id", ["", "nul\x00id", "x" * 129, None, 42, "\ud800"])
def test_a_task_id_unfit_for_the_ledger_without_a_command_id_is_invalid(
    clean_database: str, task_id: Any
) -> None:
    bad = apply.Command(task="tags.create", task_id=task_id, kwargs={"data": {"name": "t"}})
    fine = command("tags.create", data={"name": "u"})
    run(bad, fine)
    assert [outcome(bad), outcome(fine)] == ["invalid", "applied"]
    assert scalar(clean_database, "SELECT count(*) FROM dead_letters") == 1
    assert scalar(clean_database, "SELECT count(*) FROM tags") == 1


def test_a_command_id_makes_any_task_id_usable(clean_database: str) -> None:
    ok = apply.Command(task="tags.create", task_id="nul\x00id",
                       kwargs={"data": {"name": "t"}, "command_id": "good-key"})
    run(ok)
    assert outcome(ok) == "applied"


def test_an_unknown_task_with_a_very_long_name_still_gets_its_dead_letter(
    clean_database: str,
) -> None:
    long_name = apply.Command(task="x" * 500, task_id="y" * 300, kwargs={})
    run(long_name)
    assert outcome(long_name) == "unknown_command"
    assert scalar(clean_database, "SELECT length(task) FROM dead_letters") == 200


def test_two_messages_without_any_key_are_both_invalid_never_one_duplicate(
    clean_database: str,
) -> None:
    # `headers.id: null` and no command_id: keyed "None", the second was taken for the first.
    first = apply.Command(task="tags.create", task_id=None, kwargs={"data": {"name": "a"}})
    second = apply.Command(task="tags.create", task_id=None, kwargs={"data": {"name": "b"}})
    run(first)
    run(second)
    assert [outcome(first), outcome(second)] == ["invalid", "invalid"]
    assert first.key is None and "idempotency key" in str(first.rejection)
    assert scalar(clean_database, "SELECT count(*) FROM command_ledger") == 0
    assert scalar(clean_database, "SELECT count(*) FROM dead_letters WHERE command_id IS NULL"
                  ) == 2


@pytest.mark.parametrize("command_id", ["", "k" * 129, "nul\x00", 7, None])
def test_an_unusable_command_id_does_not_become_the_key(command_id: Any) -> None:
    assert apply.idempotency_key({"command_id": command_id}, "task-id") == "task-id"
    assert apply.idempotency_key({"command_id": command_id}, None) is None


def test_a_command_id_applied_by_another_task_is_a_conflict_in_a_later_batch(
    clean_database: str, author: int
) -> None:
    (tag,) = run(command("tags.create", data={"name": "first"}, command_id="shared-key"))
    assert outcome(tag) == "applied"
    # Distinct keys: claiming last, the key's INSERT fails the batch; claiming first then
    # finds the key is not its own.
    batch = run(command("tags.create", data={"name": "other"}),
                command("posts.create", data={"title": "p", "author_id": author},
                        command_id="shared-key"))
    assert [outcome(c) for c in batch] == ["applied", "conflict"]
    assert batch[1].result is None
    assert str(batch[1].rejection) == (
        "conflict: the command_id was applied by task tags.create")
    # One that would be rejected anyway (no tag 999) is a conflict too: the key decides first.
    (missing,) = run(command("tags.delete", id=999, command_id="shared-key"))
    assert outcome(missing) == "conflict"
    assert scalar(clean_database, "SELECT count(*) FROM posts") == 0
    # The first outcome stands, and each conflict has its dead letter under the key.
    assert scalar(clean_database, "SELECT task FROM command_ledger "
                                  "WHERE command_id = 'shared-key'") == "tags.create"
    assert scalar(clean_database, "SELECT count(*) FROM dead_letters "
                                  "WHERE command_id = 'shared-key' AND reason = 'conflict'") == 2
    (again,) = run(command("tags.create", data={"name": "first"}, command_id="shared-key"))
    assert outcome(again) == "duplicate"
    assert again.result == {**(tag.result or {}), "outcome": "duplicate"}


def test_a_command_id_used_by_two_tasks_in_one_batch_is_applied_once_then_a_conflict(
    clean_database: str, author: int
) -> None:
    batch = run(command("tags.create", data={"name": "t"}, command_id="same"),
                command("posts.create", data={"title": "p", "author_id": author},
                        command_id="same"),
                command("tags.create", data={"name": "t"}, command_id="same"))
    assert [outcome(c) for c in batch] == ["applied", "conflict", "duplicate"]
    assert scalar(clean_database, "SELECT count(*) FROM posts") == 0


def test_a_key_being_applied_by_another_task_in_another_transaction_is_a_conflict(
    clean_database: str,
) -> None:
    import threading

    import psycopg2

    other = psycopg2.connect(clean_database.replace("postgresql+psycopg2", "postgresql"))
    with other.cursor() as cursor:
        cursor.execute("INSERT INTO command_ledger (command_id, task, result) "
                       "VALUES ('busy-other', 'users.delete', '{\"id\": 7}')")
    late = command("tags.create", data={"name": "late"}, command_id="busy-other")
    worker = threading.Thread(target=run, args=(late,))
    worker.start()
    worker.join(1.0)
    assert worker.is_alive(), "the batch did not wait for the open transaction"
    other.commit()
    other.close()
    worker.join(30)
    assert outcome(late) == "conflict"
    assert scalar(clean_database, "SELECT count(*) FROM tags") == 0
    assert scalar(clean_database, "SELECT task FROM command_ledger") == "users.delete"


def test_a_kept_password_hash_is_applied_as_the_password_without_hashing_again(
    clean_database: str,
) -> None:
    from worker.security import hash_password

    kept = hash_password(PASSWORD)
    (created,) = run(apply.Command(
        task="users.create", task_id=str(uuid.uuid4()), kept_password_hash=kept,
        kwargs={"data": {"username": "kept", "email": "kept@example.com"}}))
    assert outcome(created) == "applied"
    assert scalar(clean_database, "SELECT hashed_password FROM users") == kept
    (with_password,) = run(apply.Command(
        task="users.create", task_id=str(uuid.uuid4()), kept_password_hash=kept,
        kwargs={"data": {"username": "k2", "email": "k2@example.com", "password": PASSWORD}}))
    assert outcome(with_password) == "invalid"
    (wrong_kind,) = run(apply.Command(task="tags.create", task_id=str(uuid.uuid4()),
                                      kept_password_hash=kept, kwargs={"data": {"name": "t"}}))
    assert outcome(wrong_kind) == "invalid"


@pytest.mark.parametrize("task_id", [None, 42, ["x"]])
def test_a_message_whose_task_id_is_not_a_string_decodes_without_one(task_id: Any) -> None:
    import json

    from worker.protocol import decode, encode

    message = json.loads(encode("tags.create", {"data": {"name": "t"}}))
    message["headers"]["id"] = task_id
    decoded = decode(json.dumps(message))
    assert decoded.task_id is None  # never "None"
    assert apply.idempotency_key(decoded.kwargs, decoded.task_id) is None
