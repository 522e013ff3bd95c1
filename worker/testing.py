"""Pytest fixtures for other projects' tests: run the command tasks eagerly, with no broker.

Use it with `pytest_plugins = ["worker.testing"]` in your `conftest.py`, point DATABASE_URL
at a PostgreSQL migrated with `alembic upgrade head`, then call `.delay()` on any task.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from worker.celery_app import app


@pytest.fixture
def eager_commands() -> Iterator[Celery]:
    """The worker's Celery app with every task run in-process when `.delay()` is called.

    A rejected command comes back as a FAILURE result (as over the broker), not as a raised
    exception; the app's previous settings are restored afterwards.
    """
    app.loader.import_default_modules()
    keys = ("task_always_eager", "task_eager_propagates", "task_store_eager_result")
    saved: dict[str, Any] = {key: app.conf.get(key) for key in keys}
    app.conf.update(
        task_always_eager=True, task_eager_propagates=False, task_store_eager_result=False
    )
    try:
        yield app
    finally:
        app.conf.update(saved)
