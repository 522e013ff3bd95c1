"""The per-process engine, session factory and command transactions (never shared across fork).

Command transactions (`transaction()`) run on a connection in autocommit mode at the driver
level, and the transaction is ours: BEGIN travels in front of the transaction's first
statement, statements whose result nobody reads (`defer`) travel in front of the next one or
of the COMMIT, and COMMIT (or ROLLBACK) is sent explicitly. A consumer process that runs its
commands one after another in one thread (`hold_connection()`: the batch consumer, a Celery
prefork child) keeps that connection between transactions: checked out from the pool (with
its pre-ping) the first time and after a failure, pinged again after an idle second. Any
other caller checks one out per transaction. psycopg2 would otherwise spend a round trip on
its own BEGIN, the pool one on a ping per checkout, and the ledger's insert one of its own.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from worker.config import Settings, database_url, get_settings

_lock = threading.Lock()
_engine: Engine | None = None
_engine_pid: int | None = None
_session_factory: sessionmaker[Session] | None = None
# The (pid, thread) that keeps its command connection (`hold_connection`), and that connection.
_holder: tuple[int, int] | None = None
_held: tuple[int, Connection] | None = None
# A held connection idle this long is pinged before use, as the pool does at checkout: after
# a quiet spell (a database restart, an idle timeout) the next command does not pay a retry.
IDLE_PING_SECONDS = 1.0
_IDLE_SINCE = "command_connection_idle_since"
# Connections inherited across fork: kept referenced so that the child never closes the
# parent's socket by garbage-collecting them.
_inherited: list[Connection] = []
STATE = "command_transaction"
PREPARED = "command_transaction_prepared"
PREPARE_ON = "command_transaction_prepare"


# A command's time limit, in force for the transactions begun meanwhile (`time_limit`).
_time_limit_ms: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "command_time_limit_ms", default=None)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Transactions begun meanwhile end with an error once they have waited `seconds`.

    PostgreSQL's own statement and lock timeouts, set for the transaction: a command blocked
    in the database (on a lock, say) is stopped there, which no signal to the process can do.
    """
    # PostgreSQL takes at most INT_MAX milliseconds (24.8 days): beyond, no limit is set.
    milliseconds = int(max(seconds, 0.001) * 1000)
    with _limited(milliseconds if milliseconds <= 2**31 - 1 else None):
        yield


def no_time_limit() -> AbstractContextManager[None]:
    """Transactions begun meanwhile run without a command's time limit (dead letters)."""
    return _limited(None)


@contextmanager
def _limited(milliseconds: int | None) -> Iterator[None]:
    token = _time_limit_ms.set(milliseconds)
    try:
        yield
    finally:
        _time_limit_ms.reset(token)


def time_limit_in_force() -> bool:
    """Whether the current transactions run under a command's time limit."""
    return _time_limit_ms.get() is not None


class _Pending:
    """What a command transaction has yet to send: its BEGIN, and deferred statements."""

    def __init__(self) -> None:
        self.begin = True
        self.deferred: list[str] = []

    def prefix(self) -> str:
        """The SQL to send ahead of the next statement (and forget)."""
        parts = (["BEGIN"] if self.begin else []) + self.deferred
        self.begin = False
        self.deferred = []
        return "".join(part + "; " for part in parts)


def sync_url(url: str) -> str:
    """`url` with the psycopg2 driver, whatever driver it names."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def pool_options(settings: Settings) -> dict[str, Any]:
    """The pool every engine of this project uses, sync or async (pre-ping always on)."""
    return {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": settings.db_pool_timeout,
        "pool_recycle": settings.db_pool_recycle,
        "pool_pre_ping": True,
    }


def build_engine(settings: Settings | None = None, url: str | None = None) -> Engine:
    """A new pooled engine with the configured pool and per-session timeouts."""
    settings = settings or get_settings()
    options = (
        f"-c statement_timeout={settings.db_statement_timeout_ms} "
        f"-c lock_timeout={settings.db_lock_timeout_ms}"
    )
    engine = create_engine(
        sync_url(url or database_url(settings)),
        **pool_options(settings),
        # A failed statement's message would otherwise carry its parameters (a payload, a
        # hash) into logs and tracebacks.
        hide_parameters=True,
        connect_args={"options": options, "application_name": "command-worker"},
    )
    event.listen(engine, "before_cursor_execute", _begin_with_first_statement, retval=True)
    return engine


_PYFORMAT = re.compile(r"%\((\w+)\)s")


@functools.lru_cache(maxsize=256)
def _prepared_forms(statement: str) -> tuple[str, str, str]:
    """(name, PREPARE body, EXECUTE) of a pyformat `statement`, worked out once per text."""
    names = list(dict.fromkeys(_PYFORMAT.findall(statement)))
    name = "cw_" + hashlib.blake2b(statement.encode(), digest_size=8).hexdigest()
    execute = f"EXECUTE {name}(" + ", ".join(f"%({each})s" for each in names) + ")"
    number = {each: index for index, each in enumerate(names, start=1)}
    body = _PYFORMAT.sub(lambda found: f"${number[found.group(1)]}", statement)
    return name, body, execute


def _preparing(connection: Connection, statement: str, parameters: Any) -> bool:
    """Whether `statement` runs as a prepared one: DB_PREPARED_STATEMENTS, and parameters."""
    return bool(connection.info.get(PREPARE_ON) and isinstance(parameters, dict) and parameters
                and _PYFORMAT.search(statement))


def _prepared(connection: Connection, statement: str) -> tuple[str, str]:
    """(the PREPARE to send first, or "", the EXECUTE) standing for a pyformat `statement`.

    Each statement is prepared once per connection, under a name taken from its text; its
    parameter types come from the casts it holds (every write statement casts its arrays).
    """
    prepared: set[str] = connection.info.setdefault(PREPARED, set())
    name, body, execute = _prepared_forms(statement)
    if name in prepared:
        return "", execute
    prepared.add(name)
    return f"PREPARE {name} AS {body}; ", execute


def _begin_with_first_statement(connection: Connection, cursor: Any, statement: str,
                                parameters: Any, context: Any, executemany: bool
                                ) -> tuple[str, Any]:
    """In a command transaction, what is pending travels with the next statement.

    With DB_PREPARED_STATEMENTS, a statement with parameters runs as a prepared one: the
    server parses and plans it once per connection instead of at every batch.
    """
    pending: _Pending | None = connection.info.get(STATE)
    if pending is None:
        return statement, parameters
    prepare = ""
    if not executemany and _preparing(connection, statement, parameters):
        prepare, statement = _prepared(connection, statement)
    if pending.begin or pending.deferred:
        prefix = pending.prefix()
        if executemany:
            cursor.execute(prefix)  # without parameters: sent as it is
        elif context is not None and context.no_parameters:
            statement = prefix + statement
        else:
            # psycopg2 interpolates the whole string: the prefix's literals keep their "%".
            statement = prefix.replace("%", "%%") + prepare + statement
            prepare = ""
    return prepare + statement, parameters


def get_engine() -> Engine:
    """This process's engine, built on first use and rebuilt in a forked child."""
    global _engine, _engine_pid, _session_factory
    with _lock:
        if _engine is None or _engine_pid != os.getpid():
            if _engine is not None:
                # Inherited from the parent: drop its pool without closing the parent's sockets.
                _engine.dispose(close=False)
            _engine = build_engine()
            _engine_pid = os.getpid()
            _session_factory = sessionmaker(bind=_engine, expire_on_commit=False)
        return _engine


def session_factory() -> sessionmaker[Session]:
    """This process's session factory."""
    get_engine()
    assert _session_factory is not None
    return _session_factory


def reset_engine() -> None:
    """Forget this process's engine (closing its connections); the next use builds a new one."""
    global _engine, _engine_pid, _session_factory, _held
    with _lock:
        if _held is not None and _held[0] == os.getpid():
            _close_quietly(_held[1])
        _held = None
        if _engine is not None and _engine_pid == os.getpid():
            _engine.dispose()
        _engine = None
        _engine_pid = None
        _session_factory = None


def after_fork() -> None:
    """Drop a pool inherited across fork, keeping the parent's connections open."""
    global _engine, _engine_pid, _session_factory, _held
    with _lock:
        if _held is not None and _held[0] != os.getpid():
            _inherited.append(_held[1])
            _held = None
        if _engine is not None and _engine_pid != os.getpid():
            _engine.dispose(close=False)
            _engine = None
            _engine_pid = None
            _session_factory = None


def _close_quietly(connection: Connection) -> None:
    try:
        connection.close()
    except sa_exc.SQLAlchemyError:
        connection.invalidate()


def hold_connection(hold: bool = True) -> None:
    """Let the calling thread keep its command connection between transactions (or stop).

    For a process that applies commands one after another in this one thread; other threads
    (and other pools: Celery's threads, gevent, eventlet) check one out per transaction.
    """
    global _holder, _held
    _holder = (os.getpid(), threading.get_ident()) if hold else None
    if not hold and _held is not None and _held[0] == os.getpid():
        _close_quietly(_held[1])
        _held = None


def _holding() -> bool:
    return _holder == (os.getpid(), threading.get_ident())


def _command_connection() -> Connection:
    """A connection for one command transaction: the held one while it is usable."""
    global _held
    engine = get_engine()
    if _holding() and _held is not None:
        pid, connection = _held
        if pid == os.getpid() and connection.engine is engine and not connection.invalidated \
                and not connection.closed and _alive(connection):
            return connection
        if pid == os.getpid():
            _close_quietly(connection)
        else:
            _inherited.append(connection)
        _held = None
    connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    if _holding():
        _held = (os.getpid(), connection)
    return connection


def _release(connection: Connection) -> None:
    """After a transaction: keep the held connection, give any other back to the pool."""
    if _held is not None and _held[1] is connection:
        if not connection.invalidated:  # an invalidated one is replaced at the next use
            connection.info[_IDLE_SINCE] = time.monotonic()
    else:
        _close_quietly(connection)


def _alive(connection: Connection) -> bool:
    """False for a connection that was idle and no longer answers (it is then invalidated)."""
    idle_since = connection.info.get(_IDLE_SINCE)
    if idle_since is None or time.monotonic() - idle_since < IDLE_PING_SECONDS:
        return True
    try:
        connection.exec_driver_sql("SELECT 1")
        connection.commit()
    except sa_exc.DBAPIError:
        connection.invalidate()
        return False
    return True


def _end(connection: Connection, statement: str) -> None:
    """Send COMMIT or ROLLBACK; errors arrive as SQLAlchemy's (a lost connection invalidated)."""
    connection.exec_driver_sql(statement)
    connection.commit()  # ends the autobegun SQLAlchemy-level transaction (nothing is sent)


_COMPILED: dict[tuple[int, int], tuple[Any, Any, Any]] = {}


def _compiled(statement: Any, dialect: Any) -> Any:
    """`statement` compiled for `dialect`, kept for the next time the same object comes."""
    key = (id(statement), id(dialect))
    found = _COMPILED.get(key)
    if found is None or found[0] is not statement or found[1] is not dialect:
        if len(_COMPILED) >= 64:  # statements built per call: keep the cache small
            _COMPILED.clear()
        found = _COMPILED[key] = (statement, dialect, statement.compile(dialect=dialect))
    return found[2]


def defer(session: Session, statement: Any, parameters: dict[str, Any]) -> None:
    """Run `statement` later in this transaction, ahead of its next statement or its COMMIT.

    For statements whose result nobody reads. Outside a command transaction it runs now. An
    error it raises surfaces at that next statement and fails the transaction all the same.
    """
    connection = session.connection()
    pending: _Pending | None = connection.info.get(STATE)
    if pending is None:
        session.execute(statement, parameters)
        return
    compiled = _compiled(statement, connection.dialect)
    sql, prepare = str(compiled), ""
    if _preparing(connection, sql, parameters):
        # As a prepared statement too: planned once per connection, not at every batch.
        prepare, sql = _prepared(connection, sql)
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        # The PREPARE too: psycopg2 turns its "%%" into "%" as in the EXECUTE.
        rendered = cursor.mogrify(prepare + sql, compiled.construct_params(parameters))
    finally:
        cursor.close()
    pending.deferred.append(rendered.decode() if isinstance(rendered, bytes) else rendered)


@contextmanager
def transaction() -> Iterator[Session]:
    """One session in one transaction: committed on success, rolled back on any error."""
    connection = _command_connection()
    pending = _Pending()
    limit = _time_limit_ms.get()
    if limit is not None:
        pending.deferred.append(f"SET LOCAL statement_timeout = {limit}; "
                                f"SET LOCAL lock_timeout = {limit}")
    connection.info[STATE] = pending
    connection.info[PREPARE_ON] = get_settings().db_prepared_statements
    try:
        with Session(bind=connection, expire_on_commit=False) as session, session.begin():
            yield session
        if not (pending.begin and not pending.deferred):  # something was, or is to be, sent
            _end(connection, "COMMIT")
    except BaseException:
        begun = not pending.begin
        pending.begin, pending.deferred = False, []
        if begun and not connection.invalidated:
            try:
                # A failed string may have stopped before or after one of its PREPAREs:
                # start again from none prepared.
                forget = "; DEALLOCATE ALL" if connection.info.pop(PREPARED, None) else ""
                _end(connection, "ROLLBACK" + forget)
            except sa_exc.SQLAlchemyError:
                connection.invalidate()  # the next transaction checks out another
        raise
    finally:
        if not connection.invalidated:
            connection.info.pop(STATE, None)
        _release(connection)
