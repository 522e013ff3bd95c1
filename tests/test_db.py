"""Command transactions: BEGIN and deferred statements ride along, and nothing leaks across."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import DBAPIError, OperationalError

from tests.conftest import scalar
from worker import db


@pytest.fixture
def statements(clean_database: str) -> Iterator[list[str]]:
    """Every statement text the command connection sends, in order."""
    sent: list[str] = []

    def record(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    engine = db.get_engine()
    event.listen(engine, "after_cursor_execute", record)
    yield sent
    event.remove(engine, "after_cursor_execute", record)


def insert_two_tags(first: str, second: str) -> None:
    """One transaction: a statement sent now, then one deferred to the COMMIT."""
    with db.transaction() as session:
        session.execute(text("INSERT INTO tags (name, version) VALUES (:n, 1)"), {"n": first})
        db.defer(session, text("INSERT INTO tags (name, version) VALUES (:n, 1)"),
                 {"n": second})


@pytest.fixture
def unprepared(monkeypatch: pytest.MonkeyPatch) -> None:
    """DB_PREPARED_STATEMENTS=false, as behind PgBouncer's transaction pooling."""
    monkeypatch.setattr(db.get_settings(), "db_prepared_statements", False)


def test_begin_travels_with_the_first_statement_and_deferred_ones_with_the_commit(
    clean_database: str, statements: list[str], unprepared: None
) -> None:
    insert_two_tags("a", "b")

    assert statements == [
        "BEGIN; INSERT INTO tags (name, version) VALUES (%(n)s, 1)",
        "INSERT INTO tags (name, version) VALUES ('b', 1); COMMIT",
    ]
    assert scalar(clean_database, "SELECT count(*) FROM tags") == 2


def test_a_statement_is_prepared_once_per_connection_then_executed(
    held: None, clean_database: str, statements: list[str]
) -> None:
    insert_two_tags("a", "b")
    insert_two_tags("c", "d")

    first, _, again, _ = statements
    name = first.split("PREPARE ")[1].split(" ")[0]
    assert first == (f"BEGIN; PREPARE {name} AS INSERT INTO tags (name, version) "
                     f"VALUES ($1, 1); EXECUTE {name}(%(n)s)")
    assert again == f"BEGIN; EXECUTE {name}(%(n)s)"
    assert scalar(clean_database, "SELECT count(*) FROM tags") == 4


def test_after_an_error_the_connection_prepares_afresh(held: None, clean_database: str,
                                                     statements: list[str]) -> None:
    insert_two_tags("a", "b")
    # The deferred insert of an existing name fails at the COMMIT, after the PREPAREs ran.
    with pytest.raises(DBAPIError):
        insert_two_tags("c", "a")
    insert_two_tags("e", "f")

    assert any("DEALLOCATE ALL" in statement for statement in statements)
    assert "PREPARE" in statements[-2]  # prepared again, on the same connection
    assert scalar(clean_database, "SELECT string_agg(name, ',' ORDER BY name) FROM tags") == \
        "a,b,e,f"


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


@pytest.fixture
def held(clean_database: str) -> Iterator[None]:
    """This thread keeps its command connection, as a consumer process does."""
    db.hold_connection()
    yield
    db.hold_connection(False)


def test_a_held_connection_killed_between_transactions_is_replaced(held: None,
                                                                    clean_database: str) -> None:
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


def test_a_held_connection_serves_only_the_thread_that_holds_it(held: None,
                                                                 clean_database: str) -> None:
    import threading

    def backend() -> int:
        with db.transaction() as session:
            return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())

    mine = [backend(), backend()]
    others: list[int] = []
    thread = threading.Thread(target=lambda: others.append(backend()))
    thread.start()
    thread.join()
    assert mine[0] == mine[1]  # kept between transactions
    assert others[0] != mine[0]  # another thread never shares it
    pool = db.get_engine().pool
    assert pool.checkedout() == 1  # the other thread's connection went back to the pool


def test_without_holding_each_transaction_gives_its_connection_back(clean_database: str
                                                                   ) -> None:
    pool = db.get_engine().pool
    for _ in range(3):
        with db.transaction() as session:
            session.execute(text("SELECT 1"))
            assert pool.checkedout() == 1
    assert pool.checkedout() == 0


def test_a_held_connection_idle_for_a_while_is_pinged_before_use(
    held: None, clean_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with db.transaction() as session:
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar()
    assert scalar(clean_database, "SELECT pg_terminate_backend(:pid)", pid=pid) is True
    monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.0)

    # The ping finds it dead: the transaction itself runs on a new connection, no error.
    with db.transaction() as session:
        assert session.execute(text("SELECT pg_backend_pid()")).scalar() != pid


def test_a_migration_under_a_prepared_statement_is_a_fault_the_retry_gets_past(
    held: None, clean_database: str
) -> None:
    from worker import apply

    def delete_tag(tag_id: int) -> apply.Command:
        done = apply.Command(task="tags.delete", task_id=f"del-{tag_id}",
                             kwargs={"id": tag_id})
        apply.run_batch([done])
        return done

    for name in ("a", "b"):
        apply.run_batch([apply.Command(task="tags.create", task_id=f"make-{name}",
                                       kwargs={"data": {"name": name}})])
    assert delete_tag(1).result is not None  # `SELECT tags.*` prepared on the connection
    engine = create_engine(clean_database)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE tags ADD COLUMN extra int"))
    try:
        with pytest.raises(DBAPIError) as changed:
            delete_tag(2)
        assert apply.is_transient(changed.value)
        assert delete_tag(2).result is not None  # the retry, prepared afresh
    finally:
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE tags DROP COLUMN extra"))
        engine.dispose()


def test_a_failed_statement_s_message_carries_no_parameters(clean_database: str) -> None:
    secret = "hunter2-parameter"
    with pytest.raises(DBAPIError) as caught, db.transaction() as session:
        session.execute(text("SELECT CAST(:p AS text), 1 / 0"), {"p": secret})
    assert secret not in str(caught.value)
    assert "parameters hidden" in str(caught.value)
