"""Alembic environment: the URL comes from the worker's settings, the schema from its models."""

from __future__ import annotations

from sqlalchemy import create_engine, pool

from alembic import context
from worker.config import database_url
from worker.db import sync_url
from worker.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    # A connection handed in by the caller (tests, `python -m worker migrate`) wins.
    return config.attributes.get("database_url") or sync_url(database_url())


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it."""
    context.configure(
        url=_url(), target_metadata=target_metadata, literal_binds=True, compare_type=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run migrations on a connection, in one transaction."""
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
