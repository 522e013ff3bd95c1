"""The operator's command line against real servers and a real worker."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import WorkerProcess
from worker.cli import app

pytestmark = pytest.mark.integration

runner = CliRunner()


def cli(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result.output


def lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.fixture
def served(worker_process: WorkerProcess, clean_database: str, broker_url: str) -> None:
    """A worker, clean tables, and the URLs in the environment (set by the fixtures)."""
    assert os.environ["DATABASE_URL"] == clean_database
    assert os.environ["BROKER_URL"] == broker_url


def test_every_command_has_help() -> None:
    for command in (["run"], ["consume"], ["migrate"], ["check"], ["send"],
                    ["dead-letters", "list"], ["dead-letters", "replay"], ["commands", "show"],
                    ["users", "by-email"], ["posts", "list"], ["tags", "get"]):
        assert "Usage" in cli(*command, "--help")


def test_send_wait_then_read_it_back(served: None) -> None:
    (user,) = lines(cli("send", "users.create", "--data", json.dumps({
        "username": "cli", "email": "Cli@Example.com", "password": "cli-password-1"}),
        "--command-id", "cli-user", "--wait", "--json"))
    assert user["outcome"] == "applied"
    (post,) = lines(cli("send", "posts.create", "--data", json.dumps({
        "title": "from the cli", "author_id": user["id"], "tags": ["b", "a"]}), "--wait",
        "--json"))
    (shown,) = lines(cli("posts", "get", str(post["id"]), "--json"))
    assert shown["author"]["username"] == "cli" and shown["tags"] == ["a", "b"]
    (listed,) = lines(cli("posts", "list", "--json"))
    assert listed["id"] == post["id"]
    assert lines(cli("users", "by-email", "cli@example.com", "--json"))[0]["id"] == user["id"]
    assert lines(cli("users", "by-username", "cli", "--json"))[0]["id"] == user["id"]
    assert lines(cli("users", "get", str(user["id"]), "--json"))[0]["username"] == "cli"
    assert len(lines(cli("tags", "list", "--json"))) == 2
    (recorded,) = lines(cli("commands", "show", "cli-user", "--json"))
    assert recorded["outcome"] == "applied" and recorded["result"]["id"] == user["id"]
    assert "cli-password-1" not in cli("users", "list")
    cli("users", "get", "999999", code=1)
    cli("users", "list", "--limit", "0", code=2)


def test_a_rejection_exits_1_and_names_its_reason(served: None) -> None:
    (outcome,) = lines(cli("send", "tags.delete", "--id", "999", "--wait", "--json", code=1))
    assert outcome["reason"] == "not_found"
    cli("send", "tags.create", "--data", "{not json", code=2)
    cli("send", "tags.create", "--data", '{"name": ""}', code=1)


def test_dead_letters_list_show_replay_and_discard(served: None) -> None:
    cli("send", "users.create", "--data", json.dumps({
        "username": "taken", "email": "taken@example.com", "password": "password-123"}),
        "--wait")
    (rejected,) = lines(cli("send", "users.create", "--data", json.dumps({
        "username": "taken", "email": "other@example.com", "password": "replay-secret-9"}),
        "--command-id", "replay-me", "--wait", "--json", code=1))
    assert rejected["reason"] == "conflict"
    (letter,) = lines(cli("dead-letters", "list", "--json"))
    assert {"id", "command_id", "task", "reason", "error", "kwargs", "received_at"} <= set(letter)
    assert letter["command_id"] == "replay-me" and letter["reason"] == "conflict"
    assert "replay-secret-9" not in json.dumps(letter)
    assert "password_hash" in letter["kwargs"]["data"]
    (shown,) = lines(cli("dead-letters", "show", str(letter["id"]), "--json"))
    assert shown["id"] == letter["id"]

    # Free the username, then replay: applied as first sent, under its command_id.
    (holder,) = lines(cli("users", "by-username", "taken", "--json"))
    cli("send", "users.delete", "--id", str(holder["id"]), "--wait")
    (replayed,) = lines(cli("dead-letters", "replay", str(letter["id"]), "--wait", "--json"))
    assert replayed["outcome"] == "applied" and replayed["command_id"] == "replay-me"
    assert lines(cli("users", "by-email", "other@example.com", "--json"))[0]["username"] == "taken"
    assert lines(cli("dead-letters", "list", "--json")) == []

    # The same command replayed again is a duplicate, not a second user.
    cli("send", "tags.delete", "--id", "77", "--wait", code=1)
    (second,) = lines(cli("dead-letters", "list", "--json"))
    cli("dead-letters", "discard", str(second["id"]))
    assert lines(cli("dead-letters", "list", "--json")) == []
    cli("dead-letters", "discard", str(second["id"]), code=1)


def test_bulk_replay_by_reason(served: None) -> None:
    for number in range(3):
        cli("send", "tags.update", "--id", str(900 + number), "--data", '{"name": "x"}',
            "--wait", code=1)
    assert len(lines(cli("dead-letters", "list", "--reason", "not_found", "--json"))) == 3
    replayed = lines(cli("dead-letters", "replay", "--reason", "not_found", "--wait", "--json",
                         code=1))
    assert [r["outcome"] for r in replayed] == ["rejected"] * 3
    assert len(lines(cli("dead-letters", "list", "--reason", "not_found", "--json"))) == 3


def test_a_replayed_applied_command_is_a_duplicate(served: None) -> None:
    (tag,) = lines(cli("send", "tags.create", "--data", '{"name": "dup"}', "--command-id",
                       "dup-1", "--wait", "--json"))
    from worker import deadletters
    from worker.db import transaction

    # A dead letter for a command that was in fact applied (e.g. recorded by an old worker).
    with transaction() as session:
        deadletters.record(session, reason="retries_exhausted", error="retries_exhausted: x",
                           command_id="dup-1", task="tags.create",
                           kwargs={"data": {"name": "dup"}})
    (letter,) = lines(cli("dead-letters", "list", "--json"))
    (replayed,) = lines(cli("dead-letters", "replay", str(letter["id"]), "--wait", "--json"))
    assert replayed["outcome"] == "duplicate"
    assert len(lines(cli("tags", "list", "--json"))) == 1 and tag["id"]


def test_check_is_healthy_on_good_servers_and_fails_on_a_bad_database(
    served: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    (report,) = lines(cli("check", "--json"))
    assert report["healthy"] is True
    from worker.config import get_settings

    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    get_settings.cache_clear()
    try:
        (report,) = lines(cli("check", "--json", code=1))
        assert report["healthy"] is False and "unreachable" in report["database"]
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
