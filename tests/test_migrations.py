"""Alembic owns the schema: upgrade, downgrade, current, history and check all work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from tests.conftest import ROOT, _fresh_database

TABLES = {"users", "posts", "tags", "post_tags", "command_ledger", "dead_letters"}


def alembic(url: str, *args: str) -> str:
    """Run the `alembic` command line against `url`, as an operator would."""
    env = {**os.environ, "DATABASE_URL": url}
    done = subprocess.run(
        [sys.executable, "-m", "alembic", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    return names - {"alembic_version"}


@pytest.fixture
def empty_database(servers: tuple[str, str]) -> str:
    return _fresh_database(servers[0])


def test_upgrade_check_downgrade_and_back(empty_database: str) -> None:
    heads = alembic(empty_database, "heads")
    head = heads.split()[0]
    alembic(empty_database, "upgrade", "head")
    assert tables(empty_database) == TABLES
    assert head in alembic(empty_database, "current")
    assert "No new upgrade operations detected" in alembic(empty_database, "check")
    assert head in alembic(empty_database, "history")
    alembic(empty_database, "downgrade", "-1")
    assert head not in alembic(empty_database, "current")
    alembic(empty_database, "upgrade", "head")
    alembic(empty_database, "downgrade", "base")
    assert tables(empty_database) == set()


def test_every_revision_file_is_in_the_history(empty_database: str) -> None:
    files = {p.name.split("_")[1] for p in Path(ROOT, "alembic", "versions").glob("*.py")}
    history = alembic(empty_database, "history")
    assert all(revision in history for revision in files)


def test_email_uniqueness_ignores_case_in_the_schema_itself(database_url: str) -> None:
    engine = create_engine(database_url)
    indexes = inspect(engine).get_indexes("users")
    engine.dispose()
    (email_index,) = [i for i in indexes if i["name"] == "uq_users_email_lower"]
    assert email_index["unique"]
    assert "lower" in str(email_index.get("expressions", email_index["column_names"]))


def test_a_dead_letter_s_hash_moves_out_of_its_kwargs_and_back(empty_database: str) -> None:
    from sqlalchemy import text

    hashed = "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
    alembic(empty_database, "upgrade", "0739f195120b")
    engine = create_engine(empty_database)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO dead_letters (reason, error, task, kwargs) VALUES "
                "('conflict', 'conflict: x', 'users.create', CAST(:kwargs AS jsonb)), "
                "('not_found', 'not_found: y', 'tags.delete', '{\"id\": 7}')"),
                {"kwargs": json.dumps({"data": {"username": "u", "password_hash": hashed}})})
        alembic(empty_database, "upgrade", "head")
        with engine.connect() as connection:
            moved = list(connection.execute(text(
                "SELECT kwargs, password_hash FROM dead_letters ORDER BY id")))
        assert [tuple(row) for row in moved] == [
            ({"data": {"username": "u", "password": "[redacted]"}}, hashed),
            ({"id": 7}, None)]
        alembic(empty_database, "downgrade", "-1")
        with engine.connect() as connection:
            back = list(connection.execute(text("SELECT kwargs FROM dead_letters ORDER BY id")))
        assert [row[0] for row in back] == [
            {"data": {"username": "u", "password_hash": hashed}}, {"id": 7}]
    finally:
        engine.dispose()
