"""The per-process engine and session factory (never shared across a fork)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from worker.config import Settings, database_url, get_settings

_lock = threading.Lock()
_engine: Engine | None = None
_engine_pid: int | None = None
_session_factory: sessionmaker[Session] | None = None


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
    return create_engine(
        sync_url(url or database_url(settings)),
        **pool_options(settings),
        connect_args={"options": options, "application_name": "command-worker"},
    )


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
    global _engine, _engine_pid, _session_factory
    with _lock:
        if _engine is not None and _engine_pid == os.getpid():
            _engine.dispose()
        _engine = None
        _engine_pid = None
        _session_factory = None


def after_fork() -> None:
    """Drop a pool inherited across fork, keeping the parent's connections open."""
    global _engine, _engine_pid, _session_factory
    with _lock:
        if _engine is not None and _engine_pid != os.getpid():
            _engine.dispose(close=False)
            _engine = None
            _engine_pid = None
            _session_factory = None


@contextmanager
def transaction() -> Iterator[Session]:
    """One session in one transaction: committed on success, rolled back on any error."""
    with session_factory().begin() as session:
        yield session
