"""The operator's command line against real servers and a real worker."""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tests.conftest import ROOT, WorkerProcess
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


def command_paths(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command of the CLI, as the words that name it (groups have `commands`)."""
    paths: list[tuple[str, ...]] = []
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            paths.extend(command_paths(command, (*prefix, name)))
        else:
            paths.append((*prefix, name))
    return paths


def test_every_command_has_help() -> None:
    paths = command_paths(typer.main.get_command(app))
    assert ("dead-letters", "replay") in paths and ("users", "by-email") in paths
    for path in paths:
        # `bench --help` is the benchmark's own argparse help ("usage: ..."), the rest Typer's.
        assert "usage" in cli(*path, "--help").lower(), path
    assert runner.invoke(app, ["send"]).exit_code == 2  # usage errors are 2


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
    assert "from the cli" in cli("posts", "get", str(post["id"]))
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
    from worker import deadletters
    from worker.db import transaction

    cli("send", "users.create", "--data", json.dumps({
        "username": "taken", "email": "taken@example.com", "password": "password-123"}),
        "--wait")
    (rejected,) = lines(cli("send", "users.create", "--data", json.dumps({
        "username": "taken", "email": "other@example.com", "password": "replay-secret-9"}),
        "--command-id", "replay-me", "--wait", "--json", code=1))
    assert rejected["reason"] == "conflict"
    (letter,) = lines(cli("dead-letters", "list", "--json"))
    assert set(letter) == {"id", "command_id", "task", "reason", "error", "kwargs",
                           "received_at"}
    assert letter["command_id"] == "replay-me" and letter["reason"] == "conflict"
    assert "replay-secret-9" not in json.dumps(letter)
    assert letter["kwargs"]["data"]["password"] == "[redacted]"
    assert "$argon2id$" not in json.dumps(letter)
    (shown,) = lines(cli("dead-letters", "show", str(letter["id"]), "--json"))
    assert shown["id"] == letter["id"]
    (recorded,) = lines(cli("commands", "show", "replay-me", "--json"))
    assert recorded["outcome"] == "rejected" and recorded["reason"] == "conflict"

    # Free the username, then replay: applied as first sent (with the kept hash), under
    # the original command_id, in this process; the dead letter is gone.
    (holder,) = lines(cli("users", "by-username", "taken", "--json"))
    cli("send", "users.delete", "--id", str(holder["id"]), "--wait")
    with transaction() as session:
        kept = deadletters.get(session, letter["id"])
        assert kept is not None
        kept_hash = kept.password_hash
    (replayed,) = lines(cli("dead-letters", "replay", str(letter["id"]), "--json"))
    assert replayed["outcome"] == "applied" and replayed["command_id"] == "replay-me"
    (user,) = lines(cli("users", "by-email", "other@example.com", "--json"))
    assert user["username"] == "taken"
    assert lines(cli("dead-letters", "list", "--json")) == []
    (recorded,) = lines(cli("commands", "show", "replay-me", "--json"))
    assert recorded["outcome"] == "applied" and recorded["result"]["id"] == user["id"]

    # The same dead letter replayed again (say, a copy kept elsewhere) is a duplicate.
    with transaction() as session:
        deadletters.record(session, reason=letter["reason"], error=letter["error"],
                           command_id=letter["command_id"], task=letter["task"],
                           kwargs=letter["kwargs"], password_hash=kept_hash)
    (again,) = lines(cli("dead-letters", "list", "--json"))
    # --wait is still accepted (older scripts): the outcome is known at once anyway.
    (duplicate,) = lines(cli("dead-letters", "replay", str(again["id"]), "--wait", "--json"))
    assert duplicate["outcome"] == "duplicate" and duplicate["command_id"] == "replay-me"
    assert len(lines(cli("users", "list", "--json"))) == 1

    # Discard: gone, and a second discard is "not found".
    cli("send", "tags.delete", "--id", "77", "--wait", code=1)
    (second,) = lines(cli("dead-letters", "list", "--json"))
    cli("dead-letters", "discard", str(second["id"]))
    assert lines(cli("dead-letters", "list", "--json")) == []
    cli("dead-letters", "discard", str(second["id"]), code=1)
    cli("dead-letters", "show", str(second["id"]), code=1)
    cli("dead-letters", "replay", str(second["id"]), code=1)


def test_bulk_replay_by_reason(served: None) -> None:
    for number in range(3):
        cli("send", "tags.update", "--id", str(900 + number), "--data", '{"name": "x"}',
            "--wait", code=1)
    assert len(lines(cli("dead-letters", "list", "--reason", "not_found", "--json"))) == 3
    replayed = lines(cli("dead-letters", "replay", "--reason", "not_found", "--json", code=1))
    assert [r["outcome"] for r in replayed] == ["rejected"] * 3
    assert len(lines(cli("dead-letters", "list", "--reason", "not_found", "--json"))) == 3
    # For people: a progress bar on stderr, then one table of what happened.
    shown = cli("dead-letters", "replay", "--reason", "not_found", code=1)
    assert "replayed dead letters" in shown and shown.count("not_found") >= 3
    assert len(lines(cli("dead-letters", "list", "--reason", "not_found", "--json"))) == 3
    assert "not_found" in cli("dead-letters", "list")


def test_check_is_healthy_on_good_servers_and_fails_on_a_bad_database(
    served: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    (report,) = lines(cli("check", "--json"))
    assert report == {"healthy": True, "database": "ok", "schema": report["schema"],
                      "broker": "ok"} and report["schema"].startswith("ok")
    with settings_from(monkeypatch, DATABASE_URL="postgresql://nobody@127.0.0.1:1/none"):
        (report,) = lines(cli("check", "--json", code=1))
    assert report["healthy"] is False and "unreachable" in report["database"]
    assert report["broker"] == "ok"


def test_check_consumer_waits_for_a_heartbeat_from_a_matching_worker(served: None) -> None:
    # Both consumers send worker heartbeats: the Celery worker as test-...@<host>, the batch
    # consumer's processes as batch-<pid>@<host>.
    (report,) = lines(cli("check", "--consumer", "--hostname", f"*@{socket.gethostname()}",
                          "--json"))
    assert report["healthy"] is True and report["broker"] == "ok"
    assert re.fullmatch(rf"ok \((test-\w+|batch-\d+)@{re.escape(socket.gethostname())}\)",
                        report["consumer"]), report
    (report,) = lines(cli("check", "--consumer", "--hostname", "*@no-such-host", "--timeout", "2",
                          "--json", code=1))
    assert report["healthy"] is False and report["broker"] == "ok"
    assert report["consumer"] == "no heartbeat from *@no-such-host in 2 s"
    assert runner.invoke(app, ["check", "--timeout", "2"]).exit_code == 2  # needs --consumer


def test_without_urls_or_a_running_server_commands_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env, no .data/servers.json here
    with settings_from(monkeypatch, DATABASE_URL=None, BROKER_URL=None):
        result = runner.invoke(app, ["check"])
        assert result.exit_code == 3, result.output
        assert "no `python -m worker run` is running" in result.output
        assert runner.invoke(app, ["check", "--consumer"]).exit_code == 3
        assert runner.invoke(app, ["users", "list"]).exit_code == 3
        assert runner.invoke(app, ["send", "tags.create", "--data", '{"name": "x"}']
                             ).exit_code == 3


def test_unreachable_servers_exit_3_with_a_message_not_a_traceback(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with settings_from(monkeypatch, DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
                       BROKER_URL="redis://127.0.0.1:1/0"):
        read = runner.invoke(app, ["users", "get", "1"])
        sent = runner.invoke(app, ["send", "tags.create", "--data", '{"name": "x"}'])
    assert read.exit_code == 3 and "cannot use the database" in read.output, read.output
    assert sent.exit_code == 3 and "cannot publish" in sent.output, sent.output


@contextmanager
def settings_from(monkeypatch: pytest.MonkeyPatch, **env: str | None) -> Iterator[None]:
    """The CLI reading `env` (None: unset) for the duration, then the suite's settings again."""
    from worker import db
    from worker.config import get_settings

    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    db.reset_engine()
    try:
        yield
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        db.reset_engine()


SERVER_VARIABLES = ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND")


def python_m_worker(*args: str, cwd: Path = ROOT, servers: bool = False,
                    **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m worker ARGS` as a shell runs it, its output piped, `env` added to an
    environment without the suite's server URLs (unless `servers`)."""
    environment = {k: v for k, v in os.environ.items()
                   if servers or k not in SERVER_VARIABLES}
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=cwd,
                          env={**environment, **env}, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize(("variable", "value", "command"), [
    ("MAX_RETRIES", "abc", ["tags", "list"]),
    ("DATABASE_URL", "foo", ["run"]),
    ("DATABASE_URL", "mysql://app:hunter2-secret@db/app", ["check"]),
    ("BROKER_URL", "http://127.0.0.1:6379/0", ["send", "tags.create", "--data", '{"name": "x"}']),
    ("FLOWER_BASIC_AUTH", "operator-without-a-password", ["run"]),
])
def test_a_bad_setting_is_one_line_that_names_it_and_exits_3(
    variable: str, value: str, command: list[str], tmp_path: Path
) -> None:
    done = python_m_worker(*command, cwd=tmp_path, **{variable: value})

    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
    assert done.stderr.startswith(f"error: bad configuration: {variable}: "), done.stderr
    assert "hunter2" not in done.stderr  # a URL's password is never repeated


def test_a_bad_setting_in_the_dot_env_file_is_reported_the_same_way(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DB_POOL_SIZE=0\n")

    done = python_m_worker("users", "list", cwd=tmp_path)

    assert done.returncode == 3, done.stderr
    assert done.stderr == ("error: bad configuration: DB_POOL_SIZE: Input should be greater than "
                           "or equal to 1 (got '0')\n")


@pytest.mark.parametrize(("command", "message"), [
    (["send", "users.creat", "--data", "{}"],
     "Invalid value for 'TASK': 'users.creat' is not one of"),
    (["dead-letters", "list", "--reason", "bogus"],
     "Invalid value for '--reason': 'bogus' is not one of 'invalid', 'not_found'"),
    (["dead-letters", "replay", "--reason", "bogus"], "Invalid value for '--reason'"),
    (["dead-letters", "replay", "2", "--reason", "stale"],
     "error: give a dead letter id or --reason, not both"),
    (["dead-letters", "replay"], "error: give a dead letter id or --reason\n"),
    (["send", "tags.create", "--data", "{not json"], "error: --data is not JSON"),
])
def test_a_usage_mistake_exits_2_with_one_line_saying_what_is_wrong(
    command: list[str], message: str, tmp_path: Path
) -> None:
    # Checked before any server is needed: no `run` serves tmp_path.
    done = python_m_worker(*command, cwd=tmp_path)
    # Typer's own wording puts pydantic's "Value error, " in front of a choice's message.
    said = done.stderr.replace("Value error, ", "")

    assert done.returncode == 2, done.stdout + done.stderr
    assert [line for line in said.splitlines() if message.strip() in line], said


def test_the_choices_the_cli_offers_are_the_contracts_tasks_and_reasons() -> None:
    from typing import get_args

    from worker.apply import SPECS
    from worker.cli import Reason, TaskName
    from worker.errors import REJECTIONS

    assert set(get_args(TaskName)) == set(SPECS)
    assert set(get_args(Reason)) == set(REJECTIONS)


HEAVY_MODULES = ("sqlalchemy", "celery", "kombu", "redis", "alembic", "pydantic_settings",
                 "worker.config", "worker.db")


@pytest.mark.parametrize("arguments", [
    ["--help"], ["send", "--help"], ["dead-letters", "replay", "--help"], ["bench", "--help"],
    ["send", "no.such.task"],
])
def test_help_and_usage_errors_are_answered_before_the_heavy_libraries_are_imported(
    arguments: list[str],
) -> None:
    probe = ("import sys\n"
             "from worker.cli import main\n"
             f"sys.argv = ['python -m worker', *{arguments!r}]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules], file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)

    assert done.stderr.splitlines()[-1] == "[]", done.stderr


def help_text(path: tuple[str, ...]) -> str:
    result = runner.invoke(app, [*path, "--help"], prog_name="python -m worker")
    assert result.exit_code == 0, result.output
    return result.output


def test_every_commands_help_reads_like_the_rest() -> None:
    paths = command_paths(typer.main.get_command(app))
    assert ("bench",) in paths
    for path in paths:
        shown = help_text(path)
        usage = shown.splitlines()[0]
        assert usage.startswith(f"Usage: python -m worker {' '.join(path)} [OPTIONS]"), shown
        # Arguments as TASK or [LETTER_ID], no type shown for a flag.
        assert not re.search(r"[{}]|\b[a-z_]+\b(?<!worker)(?<!python)(?<!-m)$", usage), usage
        assert "<bool>" not in shown and "Options:" in shown, (path, shown)


def test_help_text_is_reflowed_not_broken_where_the_docstring_breaks() -> None:
    for path in [("run",), ("dead-letters", "replay"), ("check",), ("bench",)]:
        lines = help_text(path).splitlines()
        sections = [n for n, line in enumerate(lines) if line.endswith(":") and line[0] != " "]
        description = lines[2:sections[0]]  # between the usage line and the first section
        for line, after in itertools.pairwise(description):
            if line.strip() and after.strip():
                # Filled greedily: the next line's first word would not have fitted.
                assert len(line) + 1 + len(after.split()[0]) > 78, (path, line, after)


def test_a_command_list_shows_each_summary_whole() -> None:
    listed = help_text(())
    assert "Run the worker (and Flower when FLOWER_BASIC_AUTH is set) until Ctrl-C." in " ".join(
        listed.split())
    commands = listed[listed.index("Commands:"):]
    assert "..." not in commands, commands


TIMESTAMP = re.compile(r'"\d{4}-\d\d-\d\dT[\d:.]+(Z|[+-]\d\d:?\d\d)?"')


def test_output_to_a_pipe_is_not_wrapped_or_cut_and_every_timestamp_is_utc_with_z(
    served: None,
) -> None:
    title = "A title long enough to be cut or folded by an eighty-column table, " * 2
    (user,) = lines(cli("send", "users.create", "--data", json.dumps({
        "username": "piped", "email": "piped@example.com", "password": "piped-password-1"}),
        "--command-id", "piped-user", "--wait", "--json"))
    cli("send", "posts.create", "--data", json.dumps({
        "title": title.strip(), "author_id": user["id"], "tags": ["tea", "cake"]}), "--wait")
    cli("send", "tags.delete", "--id", "424242", "--wait", code=1)

    listed = python_m_worker("posts", "list", servers=True)
    letters = python_m_worker("dead-letters", "list", servers=True)

    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if title.strip() in line]
    assert "│ piped " in row and "cake, tea" in row  # the author by name, the tags as a list
    assert "…" not in listed.stdout + letters.stdout
    assert "not_found: tag 424242 does not exist" in letters.stdout
    outputs = [python_m_worker(*command, "--json", servers=True).stdout for command in (
        ["posts", "list"], ["users", "get", str(user["id"])], ["dead-letters", "list"],
        ["commands", "show", "piped-user"])]
    stamps = [match.group(0) for text in outputs for match in TIMESTAMP.finditer(text)]
    assert len(stamps) >= 6 and all(stamp.endswith('Z"') for stamp in stamps), stamps


def test_env_prints_the_urls_in_force_for_a_shell_to_evaluate(served: None) -> None:
    done = python_m_worker("env", servers=True, COMMANDS_QUEUE="commands")
    shell = subprocess.run(["bash", "-c", f'{done.stdout}\necho "$BROKER_URL $RESULT_BACKEND"'],
                           capture_output=True, text=True, env={}, check=True, timeout=30)

    assert done.returncode == 0, done.stderr
    assert shell.stdout.split() == [os.environ["BROKER_URL"], os.environ["BROKER_URL"]]
    assert lines(python_m_worker("env", "--json", servers=True).stdout)[0]["DATABASE_URL"] == (
        os.environ["DATABASE_URL"])


def test_env_without_urls_or_a_running_server_exits_3(tmp_path: Path) -> None:
    done = python_m_worker("env", cwd=tmp_path)

    assert done.returncode == 3 and done.stdout == ""
    assert "no `python -m worker run` is running" in done.stderr


def test_flower_is_never_started_without_a_password(tmp_path: Path) -> None:
    done = python_m_worker("flower", cwd=tmp_path)

    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stderr == ("error: FLOWER_BASIC_AUTH is not set: Flower is never started "
                           "without a password (set it to user:password)\n")
