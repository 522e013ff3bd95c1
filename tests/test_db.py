"""Command transactions: BEGIN and deferred statements ride along, and nothing leaks across."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import DBAPIError, OperationalError

from worker import db


def scalar(url: str, sql: str, **params: Any) -> Any:
    engine = create_engine(url)
    with engine.connect() as connection:
        value = connection.execute(text(sql), params).scalar()
    engine.dispose()
    return value


@pytest.fixture
def statements(clean_database: str) -> list[str]:
    """Every statement text the command connection sends, in order."""
    sent: list[str] = []

    def record(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    engine = db.get_engine()
    event.listen(engine, "after_cursor_execute", record)
    yield sent
    event.remove(engine, "after_cursor_execute", record)


def test_begin_travels_with_the_first_statement_and_deferred_ones_with_the_commit(
    clean_database: str, statements: list[str]
) -> None:
    with db.transaction() as session:
        session.execute(text("INSERT INTO tags (name, version) VALUES (:n, 1)"), {"n": "a"})
        db.defer(session, text("INSERT INTO tags (name, version) VALUES (:n, 1)"), {"n": "b"})

    assert statements == [
        "BEGIN; INSERT INTO tags (name, version) VALUES (%(n)s, 1)",
        "INSERT INTO tags (name, version) VALUES ('b', 1); COMMIT",
    ]
    assert scalar(clean_database, "SELECT count(*) FROM tags") == 2


def test_percent_signs_in_deferred_values_survive_both_ways_of_sending(
    clean_database: str,
) -> None:
    tricky = ["100% %(n)s %s %%", "50%", "%"]
    with db.transaction() as session:
        db.defer(session, text("INSERT INTO tags (name, version) VALUES (:n, 1)"),
                 {"n": tricky[0]})
        # Ahead of a statement with parameters, which psycopg2 interpolates.
        session.execute(text("INSERT INTO tags (name, version) VALUES (:n, 1)"),
                        {"n": tricky[1]})
        # Ahead of the COMMIT.
        db.defer(session, text("INSERT INTO tags (name, version) VALUES (:n, 1)"),
                 {"n": tricky[2]})

    engine = create_engine(clean_database)
    with engine.connect() as connection:
        names = sorted(connection.execute(text("SELECT name FROM tags")).scalars())
    engine.dispose()
    assert names == sorted(tricky)


def test_an_error_rolls_back_what_was_sent_and_what_was_deferred(clean_database: str) -> None:
    with pytest.raises(DBAPIError), db.transaction() as session:
        session.execute(text("INSERT INTO tags (name, version) VALUES ('kept?', 1)"))
        db.defer(session, text("INSERT INTO tags (name, version) VALUES (:n, 1)"),
                 {"n": "deferred"})
        session.execute(text("SELECT 1 / 0"))

    assert scalar(clean_database, "SELECT count(*) FROM tags") == 0
    # The connection is clean for the next transaction (no aborted transaction left open).
    with db.transaction() as session:
        session.execute(text("INSERT INTO tags (name, version) VALUES ('next', 1)"))
    assert scalar(clean_database, "SELECT count(*) FROM tags") == 1


def test_an_exception_in_the_caller_rolls_back_too(clean_database: str) -> None:
    with pytest.raises(RuntimeError), db.transaction() as session:
        session.execute(text("INSERT INTO tags (name, version) VALUES ('gone', 1)"))
        raise RuntimeError("a bug between two statements")

    assert scalar(clean_database, "SELECT count(*) FROM tags") == 0


def test_a_transaction_that_sends_nothing_sends_no_begin_or_commit(
    clean_database: str, statements: list[str]
) -> None:
    with db.transaction():
        pass

    assert statements == []


def test_a_connection_killed_between_transactions_is_replaced(clean_database: str) -> None:
    with db.transaction() as session:
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar()
    assert scalar(clean_database, "SELECT pg_terminate_backend(:pid)", pid=pid) is True

    # The first try finds the connection dead: a transient error the callers retry...
    with pytest.raises(OperationalError) as lost, db.transaction() as session:
        session.execute(text("SELECT 1"))
    assert lost.value.connection_invalidated
    # ...and the next transaction runs on a new connection.
    with db.transaction() as session:
        assert session.execute(text("SELECT pg_backend_pid()")).scalar() != pid


def test_each_thread_has_its_own_connection(clean_database: str) -> None:
    import threading

    pids: list[int] = []

    def backend() -> None:
        with db.transaction() as session:
            pids.append(int(session.execute(text("SELECT pg_backend_pid()")).scalar_one()))

    backend()
    other = threading.Thread(target=backend)
    other.start()
    other.join()
    assert len(set(pids)) == 2


def test_a_connection_idle_for_a_while_is_pinged_before_use(
    clean_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with db.transaction() as session:
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar()
    assert scalar(clean_database, "SELECT pg_terminate_backend(:pid)", pid=pid) is True
    monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.0)

    # The ping finds it dead: the transaction itself runs on a new connection, no error.
    with db.transaction() as session:
        assert session.execute(text("SELECT pg_backend_pid()")).scalar() != pid
