"""The command line: `python -m worker ...` for operators and scripts (`--help` on each)."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from typer import _click  # typer vendors click: its Context is what TyperGroup.invoke takes
from typer.core import TyperArgument, TyperCommand, TyperGroup

from worker.bench import bench
from worker.errors import NoServerError, OperatorError, first_line

if TYPE_CHECKING:
    # Only for annotations: `--help` and usage errors are answered before SQLAlchemy, Celery,
    # pydantic-settings or Rich are imported (each command imports what it uses).
    from rich.console import Console
    from rich.text import Text
    from sqlalchemy.orm import Session

# Exit codes: 0 done, 1 rejected / not found / unhealthy, 2 usage, 3 no server or bad config.
REJECTED, USAGE, CONFIG = 1, 2, 3
# The width of output that is not a terminal: a pipe or a file is not 80 columns wide, so
# neither lines nor tables are folded or cut to fit one.
UNBOUNDED_WIDTH = 1_000_000


def summary(help: str | None) -> str:
    """The first paragraph of a help text in one line: what a command list shows, whole (click
    cuts it at 45 characters; the list wraps it instead)."""
    return " ".join((help or "").strip().split("\n\n")[0].split())


class Command(TyperCommand):
    """A command whose usage line names its arguments as `TASK` and `[ID]`."""

    def get_short_help_str(self, limit: int = 45) -> str:
        """The summary line of the command, whole."""
        return self.short_help or summary(self.help)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument) and param.metavar is None:
                param.metavar = (param.name or "").upper()

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        """[OPTIONS], then each argument: bare when required, in brackets when optional."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or (param.name or "").upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class CommandGroup(TyperGroup):
    """A group of commands whose operator errors end in one line and exit 3, never a traceback."""

    def get_short_help_str(self, limit: int = 45) -> str:
        """The summary line of the group, whole."""
        return self.short_help or summary(self.help)

    def invoke(self, ctx: _click.Context) -> Any:
        """Run the chosen command; a bad setting or a missing server is reported, not traced."""
        try:
            return super().invoke(ctx)
        except OperatorError as error:
            raise fail(str(error), CONFIG) from None


class CommandLine(typer.Typer):
    """A group of this CLI: plain help (fast, and reflowed to the terminal), our classes."""

    def __init__(self, help: str, **settings: Any) -> None:
        super().__init__(cls=CommandGroup, help=help, no_args_is_help=True,
                         rich_markup_mode=None, **settings)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        """Register a command of class `Command`."""
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)


app = CommandLine("A worker that applies user, post and tag commands from Redis to PostgreSQL.",
                  add_completion=False)
dead_letters_app = CommandLine("Inspect, replay and discard dead letters.")
commands_app = CommandLine("The recorded outcome of commands.")
users_app = CommandLine("Read users.")
posts_app = CommandLine("Read posts (with their author and tags).")
tags_app = CommandLine("Read tags.")
app.add_typer(dead_letters_app, name="dead-letters")
app.add_typer(commands_app, name="commands")
app.add_typer(users_app, name="users")
app.add_typer(posts_app, name="posts")
app.add_typer(tags_app, name="tags")


@cache
def output(stderr: bool = False) -> Console:
    """Where the CLI prints for people: stdout (or stderr), as wide as the output is."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=UNBOUNDED_WIDTH)
    return console


def get_settings() -> Any:
    """The settings (worker.config.get_settings, imported when a command needs them)."""
    from worker.config import get_settings as read_settings

    return read_settings()


JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]

# Spelled out here so that parsing them needs no import of the commands' modules; a test holds
# them equal to worker.apply.SPECS and worker.errors.REJECTIONS.
TaskName = Literal["users.create", "users.update", "users.delete", "posts.create",
                   "posts.update", "posts.delete", "tags.create", "tags.update", "tags.delete"]
Reason = Literal["invalid", "not_found", "conflict", "stale", "retries_exhausted",
                 "unknown_command", "undecodable"]


def fail(message: str, code: int = REJECTED) -> typer.Exit:
    """Print `message` to stderr; the exit to raise."""
    from rich.markup import escape

    # One line whatever the width: a terminal folds it, a pipe or a log keeps it whole.
    output(stderr=True).print(f"[red]error:[/] {escape(message)}", highlight=False,
                              soft_wrap=True)
    return typer.Exit(code)


def database_problem(error: Exception) -> str:
    """What to tell the operator about a database error, in one line (no traceback)."""
    from sqlalchemy.exc import ProgrammingError

    detail = first_line(error)
    if isinstance(error, ProgrammingError) and "does not exist" in detail:
        return f"the schema is not migrated ({detail}): run `python -m worker migrate`"
    return f"cannot use the database: {detail}"


@contextmanager
def session() -> Iterator[Session]:
    """A read-write session on the configured (or running embedded) database."""
    from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError

    from worker.db import transaction

    try:
        with transaction() as opened:
            yield opened
    except NoServerError as error:
        raise fail(str(error), CONFIG) from None
    except (OperationalError, InterfaceError, ProgrammingError) as error:
        # Unreachable, refused or unmigrated: a configuration problem, not a bug to trace.
        raise fail(database_problem(error), CONFIG) from None


def emit(record: dict[str, Any] | None, as_json: bool, what: str) -> None:
    """Print a record (or fail when there is none)."""
    from rich.table import Table

    if record is None:
        raise fail(f"{what} not found")
    if as_json:
        print(json.dumps(record, default=str))
        return
    table = Table(show_header=False, title=what)
    for key, value in record.items():
        table.add_row(key, _cell(value))
    output().print(table)


def emit_rows(rows: list[dict[str, Any]], as_json: bool, title: str) -> None:
    """Print records as a table, or one JSON object per line."""
    from rich.table import Table

    if as_json:
        for row in rows:
            print(json.dumps(row, default=str))
        return
    if not rows:
        output().print(f"No {title}.")
        return
    table = Table(title=title)
    # Rows may differ in keys (a rejection adds its reason): the union, in first-seen order.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    output().print(table)


def _cell(value: Any) -> Text:
    """A value as a table shows it: text as it is (never read as Rich markup), a list of
    names as a comma-separated list, anything else as JSON."""
    from rich.text import Text

    if value is None:
        return Text("")
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return Text(", ".join(value))
    return Text(value if isinstance(value, str) else json.dumps(value, default=str))


def _post_for_people(detail: dict[str, Any]) -> dict[str, Any]:
    """A post as its table row shows it: the author by username (`--json` has the record)."""
    author = detail.get("author")
    return {**detail, "author": author.get("username") if isinstance(author, dict) else author}


# --- running ------------------------------------------------------------------------------

@app.command()
def run(
    migrate: Annotated[bool, typer.Option(
        "--migrate/--no-migrate", help="Apply migrations first (else refuse an old schema).")
    ] = True,
    concurrency: Annotated[int, typer.Option(help="Pool processes.")] = os.cpu_count() or 2,
    batch_size: Annotated[int, typer.Option(help="Commands taken at once, at most.")] = 100,
) -> None:
    """Run the worker (and Flower when FLOWER_BASIC_AUTH is set) until Ctrl-C.

    With DATABASE_URL and BROKER_URL unset (or naming these very servers, as `env` prints
    them), private PostgreSQL and Redis servers are started under DATA_DIR (.data) and kept
    there between runs, on the same ports. Ctrl-C or SIGTERM stops everything in the reverse
    order it started; a part that fails stops the rest, and says why (exit 3).
    """
    from worker.runner import RunError
    from worker.runner import run as run_worker

    try:
        code = run_worker(get_settings(), apply_migrations=migrate, concurrency=concurrency,
                          batch_size=batch_size, console=output())
    except RunError as error:
        raise fail(str(error), CONFIG) from None
    raise typer.Exit(code)


@app.command("env")
def env(as_json: JsonOption = False) -> None:
    """Print the servers' URLs as shell variables: eval "$(python -m worker env)".

    DATABASE_URL, BROKER_URL, RESULT_BACKEND and COMMANDS_QUEUE as the other commands use
    them: as configured, else those of the `run` serving this directory. Any client started
    from that shell (a Celery producer, celery-node, redis-cli -u "$BROKER_URL") then reaches
    the same servers. Exit 3 when no URL is set and no `run` serves this directory.
    """
    from worker.config import broker_url, database_url, result_backend_url

    settings = get_settings()
    values = {"DATABASE_URL": database_url(settings), "BROKER_URL": broker_url(settings),
              "RESULT_BACKEND": result_backend_url(settings),
              "COMMANDS_QUEUE": settings.commands_queue}
    if as_json:
        print(json.dumps(values))
        return
    for name, value in values.items():
        print(f"export {name}={shlex.quote(value)}")


@app.command()
def flower() -> None:
    """Start Flower, the dashboard, behind FLOWER_BASIC_AUTH (never without it).

    It listens on FLOWER_ADDRESS:FLOWER_PORT (127.0.0.1:5555). The password reaches Flower in
    its environment, never on its command line (which `ps` and `docker inspect` show). `run`
    and the compose file's `flower` service start Flower this way. Exit 3 without a password.
    """
    settings = get_settings()
    if not settings.flower_basic_auth:
        raise fail("FLOWER_BASIC_AUTH is not set: Flower is never started without a password "
                   "(set it to user:password)", CONFIG)
    os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth  # also when read from .env
    # Flower takes this process's place: its pid, its signals (Ctrl-C, `docker stop`).
    # worker/flower.py puts every page of it behind the credentials (Flower leaves two open).
    os.execv(sys.executable, [sys.executable, "-m", "worker.flower",  # noqa: S606
                              f"--address={settings.flower_address}",
                              f"--port={settings.flower_port}"])


@app.command()
def consume(
    concurrency: Annotated[int, typer.Option(help="Pool processes.")] = os.cpu_count() or 2,
    batch_size: Annotated[int, typer.Option(help="Commands taken at once, at most.")] = 100,
    events: Annotated[bool, typer.Option("--events/--no-events",
                                         help="Send task events (Flower).")] = True,
) -> None:
    """Run the worker node against DATABASE_URL and BROKER_URL (no migrations).

    The same as `celery -A worker.celery_app worker -Q $COMMANDS_QUEUE -c N --batch-size N
    -E`: any other Celery worker option can be given that way instead.
    """
    from worker.config import broker_url, database_url

    try:
        database_url()
        broker_url()
    except NoServerError as error:
        raise fail(str(error), CONFIG) from None
    from worker.celery_app import app as celery_app
    from worker.runner import worker_arguments

    celery_app.worker_main(worker_arguments(concurrency, batch_size, get_settings().commands_queue,
                                            events=events))


@app.command()
def migrate() -> None:
    """Apply every migration (alembic upgrade head)."""
    from sqlalchemy.exc import OperationalError

    from worker.config import database_url
    from worker.runner import migrate as upgrade

    try:
        upgrade(database_url())
    except NoServerError as error:
        raise fail(str(error), CONFIG) from None
    except OperationalError as error:
        raise fail(database_problem(error), CONFIG) from None
    output().print("The schema is at the head revision.")


# The worker events that say a node is alive (a Celery worker sends a heartbeat every 2 s).
LIVENESS_EVENTS = ("worker-heartbeat", "worker-online")


def consumer_heard(pattern: str, timeout: float) -> str | None:
    """The hostname of the first worker matching `pattern` to send a heartbeat (or come online)
    within `timeout` seconds, heard with Celery's event receiver; None if none does.

    Celery's receiver counts its own `timeout` as seconds without *any* event, restarted by
    each one, and ends by raising socket.timeout: a deadline for the whole wait is kept here,
    checked at every turn of its loop (a turn waits at most about a second). No wakeup
    broadcast is sent: the check only listens, and leaves nothing behind in Redis.
    """
    from worker.celery_app import app as celery_app

    deadline = time.monotonic() + timeout
    heard: list[str] = []

    def on_event(event: dict[str, Any]) -> None:
        hostname = event.get("hostname")
        if not heard and isinstance(hostname, str) and fnmatch.fnmatchcase(hostname, pattern):
            heard.append(hostname)
            receiver.should_stop = True  # the loop ends before it waits again

    def on_iteration() -> None:
        if time.monotonic() >= deadline:
            raise TimeoutError  # what the receiver itself raises; its consumer is closed

    with celery_app.connection_for_read() as connection:
        # Worker events only (routing keys worker.*): task events are most of the traffic.
        receiver = celery_app.events.Receiver(
            connection, handlers=dict.fromkeys(LIVENESS_EVENTS, on_event),
            routing_key="worker.#")
        # Without x-expires kombu keeps no deadline for the binding (a `_kombu.binding_deadlines`
        # entry that would outlive the check); the auto-delete queue's binding is removed when
        # the receiver's channel closes, so nothing is left in Redis.
        receiver.queue.expires = None
        receiver.connect_max_retries = 1  # the default retries forever
        receiver.on_iteration = on_iteration
        with suppress(TimeoutError):  # socket.timeout is TimeoutError
            receiver.capture(timeout=timeout, wakeup=False)
    return heard[0] if heard else None


@app.command()
def check(
    as_json: JsonOption = False,
    consumer: Annotated[bool, typer.Option(
        "--consumer", help="Also wait for a heartbeat from a running consumer.")] = False,
    hostname: Annotated[str | None, typer.Option(
        help="With --consumer: the worker's node name, an fnmatch pattern (default: "
             "*@ and this host's name).",
        show_default=False)] = None,
    timeout: Annotated[float | None, typer.Option(
        help="With --consumer: seconds to wait for the heartbeat (default: 10).", min=0.1,
        show_default=False)] = None,
) -> None:
    """Check the database, the schema revision and the broker, printing each.

    With --consumer, also wait for a worker-heartbeat (or worker-online) event
    from a worker node whose name matches --hostname (a node sends one every
    2 s). Exit 0 when all are right, 1 when one is unreachable, the
    schema is not at head or no heartbeat came, 3 when no URL is set and no
    `run` serves this directory.
    """
    import redis

    from worker.config import broker_url, database_url
    from worker.runner import redis_warnings, schema_revisions

    if not consumer and (hostname is not None or timeout is not None):
        raise fail("--hostname and --timeout go with --consumer", USAGE)
    get_settings()  # a bad setting is the operator's to fix (exit 3), not an unhealthy server
    pattern = hostname if hostname is not None else f"*@{socket.gethostname()}"
    wait = timeout if timeout is not None else 10.0
    results: dict[str, str] = {}
    code = 0
    try:
        current, heads = schema_revisions(database_url())
        results["database"] = "ok"
        if current == heads:
            results["schema"] = f"ok ({', '.join(sorted(heads))})"
        else:
            results["schema"] = (f"at {sorted(current) or 'no revision'}, the code at "
                                 f"{sorted(heads)}: run `python -m worker migrate`")
            code = code or REJECTED
    except NoServerError as error:
        results["database"] = str(error)
        code = CONFIG
    except Exception as error:  # any failure to connect or read is the verdict, not a crash
        results["database"] = f"unreachable: {first_line(error)}"
        code = code or REJECTED
    broker_ok = False
    try:
        url = broker_url()
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            client.ping()
        finally:
            client.close()
        problems = redis_warnings(url)
        results["broker"] = "ok" + (f" (warning: {'; '.join(problems)})" if problems else "")
        broker_ok = True
    except NoServerError as error:
        results["broker"] = str(error)
        code = CONFIG
    except Exception as error:  # as above
        results["broker"] = f"unreachable: {type(error).__name__}: {first_line(error)}"
        code = code or REJECTED
    if consumer:
        if not broker_ok:
            results["consumer"] = "not checked: no broker to listen on"
            code = code or REJECTED
        else:
            try:
                heard = consumer_heard(pattern, wait)
            except Exception as error:  # as above
                heard = None
                results["consumer"] = (f"cannot listen for events: {type(error).__name__}: "
                                       f"{first_line(error)}")
            else:
                results["consumer"] = (f"ok ({heard})" if heard is not None
                                       else f"no heartbeat from {pattern} in {wait:g} s")
            if heard is None:
                code = code or REJECTED
    if as_json:
        print(json.dumps({"healthy": code == 0, **results}))
    else:
        for name, verdict in results.items():
            mark = "[green]✓[/]" if verdict.startswith("ok") else "[red]✗[/]"
            output().print(f"{mark} {name}: {verdict}", highlight=False)
    if code:
        raise typer.Exit(code)


app.command("bench", cls=Command)(bench)


# --- producing ----------------------------------------------------------------------------

@app.command()
def send(
    task: Annotated[TaskName, typer.Argument(help="The command's task name.",
                                             show_default=False)],
    data: Annotated[str | None, typer.Option(help="The command's data as JSON.")] = None,
    id: Annotated[int | None, typer.Option("--id", help="The target id (update, delete).")
                  ] = None,
    command_id: Annotated[str | None, typer.Option(help="Idempotency key (default: new).")
                          ] = None,
    expected_version: Annotated[int | None, typer.Option(help="Reject as stale otherwise.")
                                ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the outcome.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 30,
    as_json: JsonOption = False,
) -> None:
    """Validate and publish a command; with --wait print its outcome (exit 1 if rejected)."""
    from worker.client import BrokerUnreachable
    from worker.client import send as send_command
    from worker.errors import Invalid

    try:
        payload = json.loads(data) if data is not None else None
    except ValueError as error:
        raise fail(f"--data is not JSON: {error}", 2) from None
    try:
        outcome = send_command(task, data=payload, id=id, command_id=command_id,
                               expected_version=expected_version,
                               wait=timeout if wait else None)
    except Invalid as error:
        raise fail(str(error)) from None
    except (NoServerError, BrokerUnreachable) as error:
        raise fail(str(error), CONFIG) from None
    report: dict[str, Any] = {"task_id": outcome.task_id, "command_id": outcome.command_id,
                              "outcome": outcome.outcome}
    if outcome.result is not None:
        report.update(entity=outcome.result.get("entity"), id=outcome.result.get("id"),
                      data=outcome.result.get("data"))
    if outcome.reason is not None:
        report.update(reason=outcome.reason, error=outcome.error)
    emit(report, as_json, f"{task}")
    if outcome.outcome == "rejected":
        raise typer.Exit(REJECTED)
    if wait and outcome.outcome == "pending":
        raise fail(f"no outcome within {timeout} s (is a worker running?)")


# --- dead letters -------------------------------------------------------------------------

@dead_letters_app.command("list")
def dead_letters_list(
    reason: Annotated[Reason | None, typer.Option(help="Only this reason.")] = None,
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    command_id: Annotated[str | None, typer.Option(help="Only this command id.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many (default: all).")
                     ] = None,
    as_json: JsonOption = False,
) -> None:
    """Every dead letter matching the filters, oldest first."""
    from worker import deadletters

    with session() as opened:
        letters = [deadletters.to_dict(letter) for letter in deadletters.list_(
            opened, reason=reason, task=task, command_id=command_id, limit=limit)]
    if not as_json:
        letters = [{k: v for k, v in letter.items() if k != "kwargs"} for letter in letters]
    emit_rows(letters, as_json, "dead letters")


@dead_letters_app.command("show")
def dead_letters_show(letter_id: int, as_json: JsonOption = False) -> None:
    """One dead letter, with its (secret-free) arguments and raw message."""
    from worker import deadletters

    with session() as opened:
        letter = deadletters.get(opened, letter_id)
        record = None if letter is None else deadletters.to_detail(letter)
    emit(record, as_json, f"dead letter {letter_id}")


@dead_letters_app.command("replay")
def dead_letters_replay(
    letter_id: Annotated[int | None, typer.Argument(help="The dead letter to replay.")] = None,
    reason: Annotated[Reason | None, typer.Option(help="Replay every dead letter of a reason.")
                      ] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", hidden=True, help="Accepted for older scripts: the outcome is always known.")
                    ] = False,
    timeout: Annotated[float, typer.Option(hidden=True, help="Accepted for older scripts.")
                       ] = 30,
    as_json: JsonOption = False,
) -> None:
    """Apply dead letters again as first sent, here, under their original command_id.

    Each command goes through the worker's own engine in this process (a password is
    applied as the hash its dead letter kept; nothing is published) and its outcome is
    printed: applied, duplicate (applied meanwhile) or rejected with its reason, which
    records a new dead letter. The replayed dead letter is then deleted. Exit 1 when one is
    rejected again or cannot be replayed.
    """
    from rich.progress import track
    from sqlalchemy.exc import InterfaceError, OperationalError

    from worker import deadletters
    from worker.replay import Replay, apply_again

    del wait, timeout  # the outcome is known when the command is applied
    if (letter_id is None) == (reason is None):
        raise fail("give a dead letter id or --reason, not both" if letter_id is not None
                   else "give a dead letter id or --reason", USAGE)
    with session() as opened:
        letters = ([deadletters.get(opened, letter_id)] if letter_id is not None
                   else list(deadletters.list_(opened, reason=reason)))
        chosen = [Replay.of(letter) for letter in letters if letter is not None]
    if not chosen:
        raise fail(f"dead letter {letter_id} not found" if letter_id is not None
                   else f"no dead letter with reason {reason}")
    for skipped in chosen:
        if skipped.problem is not None:
            output(stderr=True).print(f"dead letter {skipped.letter_id} cannot be replayed: "
                                      f"{skipped.problem}", highlight=False)
    replayable = [replay for replay in chosen if replay.problem is None]
    # The bar goes to stderr so that stdout stays one JSON object a line, or one table.
    steps: Iterable[Replay] = (
        replayable if as_json or len(replayable) < 2
        else track(replayable, description="Replaying", console=output(stderr=True)))
    rows: list[dict[str, Any]] = []
    try:
        for replay in steps:
            row = apply_again(replay)
            rows.append(row)
            if as_json:
                print(json.dumps(row, default=str), flush=True)
    except NoServerError as error:
        raise fail(f"{error} ({len(rows)} replayed before it)", CONFIG) from None
    except (OperationalError, InterfaceError) as error:
        raise fail(f"{database_problem(error)} ({len(rows)} replayed before it)",
                   CONFIG) from None
    if rows and not as_json:
        emit_rows(rows, False, "replayed dead letters")
    if any(row["outcome"] == "rejected" for row in rows) or len(replayable) < len(chosen):
        raise typer.Exit(REJECTED)


@dead_letters_app.command("discard")
def dead_letters_discard(letter_id: int) -> None:
    """Delete a dead letter."""
    from worker import deadletters

    with session() as opened:
        found = deadletters.discard(opened, letter_id)
    if not found:
        raise fail(f"dead letter {letter_id} not found")
    output().print(f"Discarded dead letter {letter_id}.")


# --- commands -----------------------------------------------------------------------------

@commands_app.command("show")
def commands_show(command_id: str, as_json: JsonOption = False) -> None:
    """The outcome recorded for COMMAND_ID: applied (with its result) or dead-lettered."""
    from worker import deadletters, ledger
    from worker.schemas import timestamp

    with session() as opened:
        entry = ledger.get(opened, command_id)
        if entry is not None:
            record: dict[str, Any] | None = {
                "command_id": command_id, "task": entry.task, "outcome": "applied",
                "applied_at": timestamp(entry.applied_at), "result": entry.result}
        else:
            letters = deadletters.list_(opened, command_id=command_id)
            record = None if not letters else {
                "command_id": command_id, "task": letters[-1].task, "outcome": "rejected",
                "reason": letters[-1].reason, "error": letters[-1].error,
                "dead_letters": [letter.id for letter in letters]}
    emit(record, as_json, f"command {command_id}")


# --- reads --------------------------------------------------------------------------------

Skip = Annotated[int, typer.Option(help="How many to skip.")]
Limit = Annotated[int, typer.Option(help="How many at most (1 to 1000).")]


def _page(fetch: Callable[[Session, int, int], list[Any]],
          record: Callable[[Any], dict[str, Any]], skip: int, limit: int, as_json: bool,
          title: str, for_people: Callable[[dict[str, Any]], dict[str, Any]] | None = None
          ) -> None:
    from worker.errors import Invalid

    try:
        with session() as opened:
            rows = [record(item) for item in fetch(opened, skip, limit)]
    except Invalid as error:
        raise fail(str(error), USAGE) from None
    if for_people is not None and not as_json:
        rows = [for_people(row) for row in rows]
    emit_rows(rows, as_json, title)


@users_app.command("get")
def users_get(user_id: int, as_json: JsonOption = False) -> None:
    """A user by id."""
    from worker import crud

    with session() as opened:
        user = crud.users.get(opened, user_id)
        emit(crud.users.to_record(user) if user else None, as_json, f"user {user_id}")


@users_app.command("list")
def users_list(skip: Skip = 0, limit: Limit = 100, as_json: JsonOption = False) -> None:
    """Users ordered by id."""
    from worker import crud

    _page(crud.users.list_, crud.users.to_record, skip, limit, as_json, "users")


@users_app.command("by-email")
def users_by_email(email: str, as_json: JsonOption = False) -> None:
    """A user by email (case-insensitive)."""
    from worker import crud

    with session() as opened:
        user = crud.users.get_by_email(opened, email)
        emit(crud.users.to_record(user) if user else None, as_json, f"user {email}")


@users_app.command("by-username")
def users_by_username(username: str, as_json: JsonOption = False) -> None:
    """A user by username."""
    from worker import crud

    with session() as opened:
        user = crud.users.get_by_username(opened, username)
        emit(crud.users.to_record(user) if user else None, as_json, f"user {username}")


@posts_app.command("get")
def posts_get(post_id: int, as_json: JsonOption = False) -> None:
    """A post by id, with its author and tags."""
    from worker import crud

    with session() as opened:
        post = crud.posts.get(opened, post_id)
        detail = crud.posts.to_detail(post) if post else None
    if detail is not None and not as_json:
        detail = _post_for_people(detail)
    emit(detail, as_json, f"post {post_id}")


@posts_app.command("list")
def posts_list(skip: Skip = 0, limit: Limit = 100, as_json: JsonOption = False) -> None:
    """Posts ordered by id, with their author and tags (loaded in two statements)."""
    from worker import crud

    _page(crud.posts.list_, crud.posts.to_detail, skip, limit, as_json, "posts",
          for_people=_post_for_people)


@tags_app.command("get")
def tags_get(tag_id: int, as_json: JsonOption = False) -> None:
    """A tag by id."""
    from worker import crud

    with session() as opened:
        tag = crud.tags.get(opened, tag_id)
        emit(crud.tags.to_record(tag) if tag else None, as_json, f"tag {tag_id}")


@tags_app.command("list")
def tags_list(skip: Skip = 0, limit: Limit = 100, as_json: JsonOption = False) -> None:
    """Tags ordered by id."""
    from worker import crud

    _page(crud.tags.list_, crud.tags.to_record, skip, limit, as_json, "tags")


def main() -> None:
    """Entry point of `python -m worker`."""
    app(prog_name="python -m worker")


if __name__ == "__main__":
    main()
