"""Applying commands: validate, claim each key in the ledger, write in sets, record outcomes.

One engine serves both consumers: a Celery task applies a batch of one, the batch consumer a
batch of many. A batch is one transaction; within it, consecutive commands of one kind are
written together (worker/writes.py), and every outcome, dead letters included, commits with
the effects or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.orm import Session

from worker import db, deadletters, writes
from worker.config import get_settings
from worker.db import transaction
from worker.errors import (
    CommandRejected,
    Conflict,
    Invalid,
    NotFound,
    RetriesExhausted,
    UnknownCommand,
)
from worker.schemas import (
    KEPT_PASSWORD_HASH,
    CreateCommand,
    DeleteCommand,
    PasswordHolder,
    PostCreate,
    PostUpdate,
    TagCreate,
    TagUpdate,
    UpdateCommand,
    UserCreate,
    UserUpdate,
    parse,
)
from worker.security import hash_password, printable

logger = logging.getLogger(__name__)

Entity = Literal["user", "post", "tag"]

# SQLSTATEs worth another try: serialization failure, deadlock, lock timeout, statement
# timeout, admin/crash shutdown, cannot connect now, too many connections, connection errors.
TRANSIENT_SQLSTATES = frozenset(
    {"40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03", "53300",
     "08000", "08001", "08003", "08004", "08006",
     # A connection's prepared statements out of step with what the worker believes (gone,
     # already there, or planned for a table a migration changed since): after the rollback
     # they are all deallocated (worker/db.py), and the next try prepares them afresh.
     "26000", "42P05"}
)


# Reasons whose dead letter keeps the message as it came, for inspection.
RAW_KEPT = frozenset({"undecodable", "unknown_command"})


@dataclass(frozen=True)
class Spec:
    """A command kind: its entity, keyword-argument and data models, and its set-based write."""

    entity: Entity
    envelope: type[BaseModel]
    data_model: type[BaseModel] | None
    write: Callable[[Session, list[Any]], list[writes.Outcome]]

    @property
    def creates(self) -> bool:
        """Whether the command makes a new entity (so it has no target id)."""
        return self.envelope is CreateCommand


SPECS: dict[str, Spec] = {
    "users.create": Spec("user", CreateCommand, UserCreate, writes.create_users),
    "users.update": Spec("user", UpdateCommand, UserUpdate, writes.update_users),
    "users.delete": Spec("user", DeleteCommand, None, writes.delete_users),
    "posts.create": Spec("post", CreateCommand, PostCreate, writes.create_posts),
    "posts.update": Spec("post", UpdateCommand, PostUpdate, writes.update_posts),
    "posts.delete": Spec("post", DeleteCommand, None, writes.delete_posts),
    "tags.create": Spec("tag", CreateCommand, TagCreate, writes.create_tags),
    "tags.update": Spec("tag", UpdateCommand, TagUpdate, writes.update_tags),
    "tags.delete": Spec("tag", DeleteCommand, None, writes.delete_tags),
}


@dataclass
class Command:
    """One received command and, once applied, its outcome.

    `task_id` is the message's task id as sent (None when it has none, or not a string);
    `key` the idempotency key `prepare` derives (see `idempotency_key`). `password_hash` is
    the hash `prepare` made of the password (a dead letter keeps it). `kept_password_hash`
    never comes from a message: a replay sets it to the hash a dead letter kept, and it
    stands for the password, which the dead letter does not have.
    """

    task: str
    task_id: str | None
    kwargs: Any
    args: Any = field(default_factory=list)
    deliveries: int = 1
    key: str | None = None
    item: Any = None
    password_hash: str | None = None
    kept_password_hash: str | None = None
    result: dict[str, Any] | None = None
    rejection: CommandRejected | None = None
    raw: bytes | None = None
    #: What a dead letter keeps of a message that is not kept whole (over-size, compressed).
    evidence: deadletters.RawEvidence | None = None

    @property
    def target(self) -> int | None:
        """The id an update or delete acts on."""
        return self.item.id if isinstance(self.item, writes.Change) else None


MAX_KEY_LENGTH = 128


def usable_key(value: object) -> bool:
    """Whether `value` can be an idempotency key: text of 1 to 128 characters that the ledger
    can hold (no NUL, no unpaired surrogate)."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_KEY_LENGTH or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def idempotency_key(kwargs: Any, task_id: object) -> str | None:
    """The command's key: a usable `command_id`, else a usable task id, else None.

    None makes the command `invalid`: without a key of its own, a message would be keyed
    by a stand-in ("None", "") that the next such message shares, and taken for a duplicate
    of it. A task id that is missing, null, not a string, empty, longer than 128 characters
    or not storable text is not usable; neither is such a `command_id`.
    """
    command_id = kwargs.get("command_id") if isinstance(kwargs, dict) else None
    if usable_key(command_id):
        return str(command_id)
    if usable_key(task_id):
        return str(task_id)
    return None


def needs_hash(command: Command) -> bool:
    """Whether applying `command` hashes a password (cheap: looks, does not validate)."""
    if command.task not in ("users.create", "users.update") or not isinstance(command.kwargs,
                                                                             dict):
        return False
    data = command.kwargs.get("data")
    return isinstance(data, dict) and isinstance(data.get("password"), str)


def prepare(command: Command) -> None:
    """Validate `command` and hash its password (slow: done before any transaction opens)."""
    command.key = idempotency_key(command.kwargs, command.task_id)
    try:
        if command.deliveries > get_settings().max_deliveries:
            # Every earlier delivery ended with its worker gone: stop the loop here.
            raise RetriesExhausted(f"delivered {command.deliveries} times without finishing "
                                   "(its worker died each time)")
        spec = SPECS.get(command.task)
        if spec is None:
            raise UnknownCommand(f"no task named {printable(command.task)!r}")
        if command.args:
            raise Invalid("positional arguments are not accepted: send keyword arguments only")
        if command.key is None:
            raise Invalid("no usable idempotency key: the task id is missing, not a string, "
                          "empty, longer than 128 characters or not storable text, and no "
                          "valid command_id was given")
        envelope: Any = parse(spec.envelope, command.kwargs)
        data = None
        if spec.data_model is not None:
            context = None
            if command.kept_password_hash is not None:
                if spec.entity != "user":
                    raise Invalid("a kept password hash goes with users commands only")
                context = {KEPT_PASSWORD_HASH: command.kept_password_hash}
            data = parse(spec.data_model, envelope.data, "data", context)
            if isinstance(data, PasswordHolder):
                if data.password is not None:
                    data = data.with_password_hash(
                        hash_password(data.password.get_secret_value()))
                # Made now, or kept by a dead letter: what a new dead letter would keep.
                command.password_hash = data.password_hash
        if spec.creates:
            command.item = data
        else:
            command.item = writes.Change(id=envelope.id,
                                         expected_version=envelope.expected_version, data=data)
    except CommandRejected as rejection:
        command.rejection = rejection


def _claim(session: Session, commands: Sequence[Command]) -> None:
    """Claim every key; a key applied before makes its command a duplicate of that result.

    A key belongs to the task that applied it: sent again on another task, the command is
    rejected `conflict` (the first outcome stands; another entity's result is not its own).
    """
    keys = [command.key for command in commands]
    claimed = {row[0] for row in session.execute(text(
        "INSERT INTO command_ledger (command_id, task, result) "
        "SELECT k, t, '{}' FROM unnest(CAST(:keys AS text[]), CAST(:tasks AS text[])) AS v(k, t) "
        "ON CONFLICT (command_id) DO NOTHING RETURNING command_id"),
        {"keys": keys, "tasks": [command.task for command in commands]})}
    seen = [command for command in commands if command.key not in claimed]
    if not seen:
        return
    stored = {row.command_id: row for row in session.execute(text(
        "SELECT command_id, task, result FROM command_ledger "
        "WHERE command_id = ANY(CAST(:keys AS text[]))"),
        {"keys": [command.key for command in seen]})}
    for command in seen:
        entry = stored[command.key]
        if entry.task != command.task:
            command.rejection = Conflict(f"the command_id was applied by task "
                                         f"{printable(entry.task)}")
        else:
            command.result = {**entry.result, "outcome": "duplicate"}


Key = tuple[str, object]


@dataclass(frozen=True)
class Footprint:
    """What a command writes and what it only reads, as keys.

    Two commands give the same outcomes in either order unless one writes a key the other
    reads or writes. Commands that only read a key commute: posts naming the same tag (a
    missing one is created by whichever comes first, the same tag either way, and results
    name tags, not their ids), a post and an update of its author's name.
    """

    writes: frozenset[Key]
    reads: frozenset[Key] = frozenset()


def footprint(command: Command) -> Footprint | None:
    """What a command reads or writes; None for one whose reach is open-ended."""
    item = command.item
    data = item.data if isinstance(item, writes.Change) else item
    kind = command.task
    if kind == "users.create":
        return Footprint(frozenset({("username", data.username), ("email", data.email.lower())}))
    if kind == "users.update":
        keys: set[Key] = {("user", item.id)}
        if data.username is not None:
            keys.add(("username", data.username))
        if data.email is not None:
            keys.add(("email", data.email.lower()))
        return Footprint(frozenset(keys))
    if kind == "posts.create":
        # The author is only checked to exist: only users.delete (open-ended) changes that.
        return Footprint(frozenset(), frozenset({("author", data.author_id),
                                                 *(("tag", name) for name in data.tags)}))
    if kind == "posts.update":
        return Footprint(frozenset({("post", item.id)}),
                         frozenset(("tag", name) for name in data.tags or ()))
    if kind == "posts.delete":
        return Footprint(frozenset({("post", item.id)}))
    if kind == "tags.create":
        return Footprint(frozenset({("tag", data.name)}))
    # users.delete reaches the user's posts, tags.update/delete every post with the tag.
    return None


def _runs(commands: Sequence[Command]) -> list[list[Command]]:
    """The commands grouped into runs of one kind, each applied in one set-based write.

    A command joins an earlier run of its kind when nothing it would overtake conflicts with
    its footprint (so every outcome is the one of applying the commands in queue order) and
    the run has no command on the same target yet; otherwise it starts a new run.
    """
    runs: list[list[Command]] = []
    targets: list[set[int]] = []
    # Per run, the keys its commands write and read; None once one has an open-ended reach.
    reach: list[tuple[set[Key], set[Key]] | None] = []
    for command in commands:
        mine = footprint(command)
        joined = None
        if mine is None:
            # Open-ended reach: it may only join the run right before it.
            if runs and runs[-1][0].task == command.task and command.target not in targets[-1]:
                joined = len(runs) - 1
        else:
            written: set[Key] = set()
            read: set[Key] = set()
            for index in range(len(runs) - 1, -1, -1):
                if (runs[index][0].task == command.task and command.target not in targets[index]
                        and not mine.writes & (written | read) and not mine.reads & written):
                    joined = index
                    break
                theirs = reach[index]
                if theirs is None:
                    break
                written |= theirs[0]
                read |= theirs[1]
        if joined is None:
            runs.append([])
            targets.append(set())
            reach.append((set(), set()))
            joined = len(runs) - 1
        runs[joined].append(command)
        if command.target is not None:
            targets[joined].add(command.target)
        current = reach[joined]
        if mine is None or current is None:
            reach[joined] = None
        else:
            current[0].update(mine.writes)
            current[1].update(mine.reads)
    return runs


# The ledger statements that travel with the next statement or the COMMIT (`db.defer`).
_LEDGER_RESULTS = text(
    "UPDATE command_ledger SET result = CAST(v.r AS jsonb), applied_at = clock_timestamp() "
    "FROM unnest(CAST(:keys AS text[]), CAST(:results AS text[])) AS v(k, r) "
    "WHERE command_ledger.command_id = v.k")
_LEDGER_INSERT = text(
    "INSERT INTO command_ledger (command_id, task, result, applied_at) "
    "SELECT k, t, CAST(r AS jsonb), clock_timestamp() FROM unnest("
    "CAST(:keys AS text[]), CAST(:tasks AS text[]), CAST(:results AS text[])) AS v(k, t, r)")
_LEDGER_FORGET = text("DELETE FROM command_ledger WHERE command_id = ANY(CAST(:keys AS text[]))")


def _apply_round(session: Session, commands: Sequence[Command], claim_first: bool) -> None:
    """Apply commands whose keys are distinct, in order, within the caller's transaction.

    Claiming first, a key applied before is found up front and its command is a duplicate
    (or a conflict, when another task applied it). Claiming last (the fast way, one
    statement fewer and each key written once), every key is inserted after the writes with
    a plain INSERT: a key applied before, or being applied by another transaction (which the
    INSERT waits for), fails the whole transaction with a unique violation, and `run_batch`
    applies the batch again, claiming first.
    """
    valid = [command for command in commands if command.rejection is None]
    if valid and claim_first:
        _claim(session, valid)
    # Neither a duplicate nor a key of another task's (whose ledger entry is not its own).
    fresh = [command for command in valid
             if command.result is None and command.rejection is None]
    for run in _runs(fresh):
        spec = SPECS[run[0].task]
        for command, outcome in zip(run, spec.write(session, [c.item for c in run]),
                                    strict=True):
            if isinstance(outcome, CommandRejected):
                command.rejection = outcome
            else:
                command.result = {"command_id": command.key, "outcome": "applied",
                                  "entity": spec.entity, "id": outcome["id"], "data": outcome}
    applied = [command for command in fresh if command.rejection is None]
    # A rejection leaves no ledger entry: the same key may be applied by a replay.
    rejected = [command.key for command in fresh if command.rejection is not None]
    # Nobody reads what these return: they travel with the next statement or the COMMIT.
    if claim_first:
        if applied:
            db.defer(session, _LEDGER_RESULTS, {
                "keys": [command.key for command in applied],
                "results": [orjson.dumps(command.result).decode() for command in applied]})
    elif fresh:
        # Rejected keys too, and deleted again: one applied before must fail the batch too.
        db.defer(session, _LEDGER_INSERT, {
            "keys": [command.key for command in fresh],
            "tasks": [command.task for command in fresh],
            "results": [orjson.dumps(command.result).decode()
                        if command.rejection is None else "{}" for command in fresh]})
    if rejected:
        db.defer(session, _LEDGER_FORGET, {"keys": rejected})
    for command in commands:
        if command.rejection is not None:
            record_dead_letter(session, command)


def apply(session: Session, commands: Sequence[Command], claim_first: bool = True) -> None:
    """Apply prepared commands in order inside the caller's transaction (no commit).

    `claim_first=False` (see `_apply_round`) needs distinct keys and a caller ready to apply
    the batch again, claiming first, when the transaction fails: `run_batch`.
    """
    remaining = list(commands)
    while remaining:
        # A key sent twice in one batch: the later copy waits for the next round.
        keys: set[str | None] = set()
        this_round: list[Command] = []
        later: list[Command] = []
        for command in remaining:
            if command.rejection is None and command.key in keys:
                later.append(command)
            else:
                keys.add(command.key)
                this_round.append(command)
        assert claim_first or not later, "claiming last needs distinct keys"
        _apply_round(session, this_round, claim_first)
        remaining = later


def record_dead_letter(session: Session, command: Command) -> None:
    """The dead letter of a rejected command (redacted; a password kept only as its hash)."""
    assert command.rejection is not None
    deadletters.record(session, command_id=command.key, task=command.task or None,
                       reason=command.rejection.reason, error=str(command.rejection),
                       kwargs=command.kwargs, args=command.args,
                       password_hash=command.password_hash,
                       raw=command.evidence if command.evidence is not None
                       else deadletters.raw_evidence(command.raw)
                       if command.raw is not None and command.rejection.reason in RAW_KEPT
                       else None)


def is_transient(error: BaseException) -> bool:
    """Whether `error` is a fault another try may not meet (connection, lock, deadlock)."""
    if isinstance(error, sa_exc.TimeoutError):
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        sqlstate = getattr(error.orig, "pgcode", None)
        if sqlstate is None:
            return isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError)
        if sqlstate == "0A000" and "cached plan must not change result type" in str(error.orig):
            return True
        return sqlstate in TRANSIENT_SQLSTATES
    return False


def rejection_for(error: sa_exc.DBAPIError) -> CommandRejected | None:
    """The rejection a database error stands for, if it is a permanent one."""
    sqlstate = getattr(error.orig, "pgcode", None)
    if sqlstate == "23505":
        return Conflict("a unique value is taken")
    if sqlstate == "23503":
        return NotFound("a referenced record does not exist")
    if sqlstate is not None and sqlstate.startswith("22"):
        return Invalid("a value does not fit its column")
    return None


def run_batch(commands: Sequence[Command], claim_first: bool = False) -> None:
    """Prepare and apply `commands` as one transaction; transient faults are raised.

    The batch first claims its keys last (see `_apply_round`); any permanent database error
    then rolls it back and it is applied again claiming first: a key applied before comes out
    a duplicate there. A permanent database error the checks did not foresee (a race with
    another worker) while claiming first rolls the batch back too; each command is then
    applied alone, so the error lands on the one command it belongs to.
    """
    for command in commands:
        if command.key is None and command.rejection is None and command.result is None:
            prepare(command)
        elif command.key is None:
            # Rejected before it could be prepared (undecodable, over the size limit, nested
            # too deeply): its dead letter is filed under its key all the same, when it has one.
            command.key = idempotency_key(command.kwargs, command.task_id)
    keys = [command.key for command in commands if command.rejection is None]
    claim_first = claim_first or len(set(keys)) < len(keys)
    try:
        with transaction() as session:
            apply(session, commands, claim_first)
    except sa_exc.SQLAlchemyError as error:
        _reset(commands)
        if is_transient(error) or not isinstance(error, sa_exc.DBAPIError):
            raise
        if not claim_first:
            run_batch(commands, claim_first=True)
            return
        if len(commands) > 1:
            for command in commands:
                run_batch([command], claim_first=True)
            return
        (command,) = commands
        rejection = rejection_for(error)
        if rejection is None:
            raise
        command.rejection = rejection
        with transaction() as session:
            record_dead_letter(session, command)


def _reset(commands: Sequence[Command]) -> None:
    """Forget outcomes of a rolled-back transaction (validation rejections stay)."""
    for command in commands:
        command.result = None
        if command.rejection is not None and command.item is not None:
            command.rejection = None


def record_exhausted(command: Command, detail: str,
                     rejection: type[RetriesExhausted] = RetriesExhausted) -> None:
    """Dead-letter a command whose transient faults (or time limit) outlasted the policy."""
    command.result = None
    command.rejection = rejection(detail)
    with transaction() as session:
        record_dead_letter(session, command)
