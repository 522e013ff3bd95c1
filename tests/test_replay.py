"""Replaying dead letters in-process: applied as first sent, the password as its kept hash."""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from worker import apply, deadletters
from worker.cli import app
from worker.db import transaction
from worker.security import verify_password

PASSWORD = "replayed password 1"
runner = CliRunner()


def cli(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result.output


def lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def run(task: str, **kwargs: Any) -> apply.Command:
    command = apply.Command(task=task, task_id=str(uuid.uuid4()), kwargs=kwargs)
    apply.run_batch([command])
    return command


def rows(url: str, sql: str) -> list[Any]:
    engine = create_engine(url)
    with engine.connect() as connection:
        found = list(connection.execute(text(sql)))
    engine.dispose()
    return found


def test_a_rejected_signup_is_replayed_in_process_with_its_original_password_hash(
    clean_database: str,
) -> None:
    holder = run("users.create", data={"username": "first", "email": "taken@example.com",
                                       "password": "another password"})
    rejected = run("users.create", command_id="signup-2", data={
        "username": "second", "email": "TAKEN@example.com", "password": PASSWORD})
    assert rejected.rejection is not None and rejected.rejection.reason == "conflict"
    (letter,) = lines(cli("dead-letters", "list", "--json"))
    assert letter["kwargs"]["data"]["password"] == "[redacted]"
    assert PASSWORD not in json.dumps(letter) and "$argon2id$" not in json.dumps(letter)
    ((kept,),) = rows(clean_database, "SELECT password_hash FROM dead_letters")

    # Still taken: rejected again, with a new dead letter that keeps the same hash.
    (again,) = lines(cli("dead-letters", "replay", str(letter["id"]), "--json", code=1))
    assert (again["outcome"], again["reason"]) == ("rejected", "conflict")
    (second_letter,) = lines(cli("dead-letters", "list", "--json"))
    assert second_letter["id"] != letter["id"]
    assert second_letter["kwargs"] == letter["kwargs"]
    assert rows(clean_database, "SELECT password_hash FROM dead_letters") == [(kept,)]

    # The other user goes; the replay applies the command as first sent.
    assert holder.result is not None
    run("users.delete", id=holder.result["id"])
    (replayed,) = lines(cli("dead-letters", "replay", str(second_letter["id"]), "--json"))
    assert replayed["outcome"] == "applied" and replayed["command_id"] == "signup-2"
    ((username, hashed),) = rows(clean_database, "SELECT username, hashed_password FROM users")
    assert username == "second" and hashed == kept
    assert verify_password(hashed, PASSWORD)
    assert lines(cli("dead-letters", "list", "--json")) == []
    (recorded,) = lines(cli("commands", "show", "signup-2", "--json"))
    assert recorded["outcome"] == "applied" and recorded["task"] == "users.create"


def test_a_replayed_password_change_sets_the_kept_hash(clean_database: str) -> None:
    user = run("users.create", data={"username": "u", "email": "u@example.com",
                                     "password": "old password 1"})
    assert user.result is not None
    stale = run("users.update", id=user.result["id"], expected_version=7,
                data={"password": PASSWORD})
    assert stale.rejection is not None and stale.rejection.reason == "stale"
    (letter,) = lines(cli("dead-letters", "list", "--json"))
    with transaction() as session:
        found = deadletters.get(session, letter["id"])
        assert found is not None and found.kwargs is not None
        found.kwargs = {**found.kwargs, "expected_version": 1}
    (replayed,) = lines(cli("dead-letters", "replay", str(letter["id"]), "--json"))
    assert replayed["outcome"] == "applied"
    ((hashed,),) = rows(clean_database, "SELECT hashed_password FROM users")
    assert verify_password(hashed, PASSWORD)


def test_a_command_applied_meanwhile_replays_as_a_duplicate(clean_database: str) -> None:
    run("tags.create", command_id="tag-1", data={"name": "kept"})
    with transaction() as session:
        deadletters.record(session, reason="conflict", error="conflict: x", task="tags.create",
                           command_id="tag-1", kwargs={"data": {"name": "kept"}})
    (replayed,) = lines(cli("dead-letters", "replay", "--reason", "conflict", "--json"))
    assert replayed["outcome"] == "duplicate" and replayed["command_id"] == "tag-1"
    assert rows(clean_database, "SELECT count(*) FROM dead_letters") == [(0,)]


def test_a_dead_letter_not_kept_as_sent_is_not_replayed(clean_database: str) -> None:
    with transaction() as session:
        # A secret other than a password (no hash stands for it), a password with no hash,
        # a value only storable escaped.
        for kwargs in ({"data": {"name": "n", "token": "t"}},
                       {"data": {"username": "u", "email": "u@x.io", "password": "p" * 9}},
                       {"data": {"name": "nul\x00"}}):
            deadletters.record(session, reason="invalid", error="invalid: x",
                               task="tags.create", kwargs=kwargs)
    output = runner.invoke(app, ["dead-letters", "replay", "--reason", "invalid", "--json"])
    assert output.exit_code == 1
    assert output.output.count("cannot be replayed") == 3
    assert rows(clean_database, "SELECT count(*) FROM dead_letters") == [(3,)]
    assert rows(clean_database, "SELECT count(*) FROM tags") == [(0,)]


def test_bulk_replay_shows_a_progress_bar_then_one_table(clean_database: str) -> None:
    for number in range(3):
        run("tags.update", id=900 + number, data={"name": "x"})
    shown = runner.invoke(app, ["dead-letters", "replay", "--reason", "not_found"])
    assert shown.exit_code == 1
    assert "Replaying" in shown.output and "replayed dead letters" in shown.output
    assert shown.output.count("not_found") >= 3
    assert rows(clean_database, "SELECT count(*) FROM dead_letters") == [(3,)]
