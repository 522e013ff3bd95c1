"""The Celery app: JSON only, the commands queue, the batch intake step, the command tasks.

Importing this module registers the nine command tasks (`app.tasks["tags.create"]` works
without a worker) and makes kombu's Redis URLs use worker/transport.py's transport.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any

import click
from celery import Celery, signals
from celery.exceptions import CPendingDeprecationWarning
from kombu.entity import Queue

from worker import db, transport
from worker.config import NoServerError, Settings, broker_url, get_settings, result_backend_url

# Before any connection is made: every redis:// (and sentinel://) URL gets the batch channel.
transport.register()
# Celery warns, at every lost broker connection, that it will one day cancel running tasks
# then: not this worker's concern (pool processes acknowledge on connections of their own).
warnings.filterwarnings("ignore", message=r"\s*In Celery 5.1 we introduced an optional",
                        category=CPendingDeprecationWarning)

logger = logging.getLogger(__name__)

TASK_MODULES = ["tasks.users", "tasks.posts", "tasks.tags"]
#: Commands taken from the queue at once, at most (`celery worker --batch-size`).
DEFAULT_BATCH_SIZE = 100


def _urls(settings: Settings) -> tuple[str | None, str | None]:
    try:
        return broker_url(settings), result_backend_url(settings)
    except NoServerError:
        return None, None


def configure(app: Celery, settings: Settings) -> None:
    """Apply the worker's configuration to `app`."""
    broker, backend = _urls(settings)
    queue = settings.commands_queue
    app.conf.update(
        broker_url=broker or "memory://",
        result_backend=backend or "cache+memory://",
        task_serializer="json",
        result_serializer="json",
        accept_content=["application/json"],
        result_accept_content=["application/json"],
        event_serializer="json",
        task_default_queue=queue,
        task_queues=[Queue(queue, routing_key=queue)],
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        # Batch jobs in flight per pool process: one applied, one ready to follow.
        worker_prefetch_multiplier=2,
        worker_batch_size=DEFAULT_BATCH_SIZE,
        worker_send_task_events=True,
        task_send_sent_event=True,
        result_expires=settings.result_expires,
        result_extended=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Pool processes acknowledge on connections of their own: a lost consumer connection
        # leaves their batches to finish.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout,
            "socket_timeout": 10,
            "socket_connect_timeout": 10,
            "socket_keepalive": True,
            "health_check_interval": 10,
            "retry_on_timeout": True,
            **({"master_name": settings.broker_sentinel_master}
               if settings.broker_sentinel_master else {}),
        },
        # A sentinel:// result backend (the default with a sentinel:// broker) finds its
        # master by the same name as the broker.
        result_backend_transport_options={
            "retry_policy": {"timeout": 10.0},
            **({"master_name": settings.broker_sentinel_master}
               if settings.broker_sentinel_master else {}),
        },
        redis_socket_timeout=10,
        redis_socket_connect_timeout=10,
        redis_socket_keepalive=True,
        redis_backend_health_check_interval=10,
        broker_pool_limit=10,
    )
    app.conf.worker_unconfigured_reason = (
        None if broker else "BROKER_URL is not set and no `python -m worker run` is running here"
    )


app = Celery("worker", include=TASK_MODULES)
configure(app, get_settings())
app.user_options["worker"].add(click.Option(
    ["--batch-size"], type=click.IntRange(1, 1000), default=None,
    help=f"Commands taken from the queue at once, at most (default {DEFAULT_BATCH_SIZE})."))


@signals.worker_init.connect
def _refuse_without_broker(**_: Any) -> None:
    reason = app.conf.get("worker_unconfigured_reason")
    if reason:
        raise SystemExit(f"error: {reason}; set BROKER_URL and DATABASE_URL")


@signals.worker_init.connect
def _import_the_driver_before_fork(**_: Any) -> None:
    # Pool processes would import psycopg2 at their first transaction, and a signal that
    # arrives meanwhile (SIGTERM of `revoke --terminate`) is swallowed by its C module's
    # initialisation: the process runs on and commits. Imported here, they inherit it.
    importlib.import_module("psycopg2")


@signals.worker_process_init.connect
def _new_pool_after_fork(**_: Any) -> None:
    import gc

    db.after_fork()
    # A prefork child runs one task at a time, in this thread: it keeps its connection.
    db.hold_connection()
    # What exists now lives as long as the child: out of the collector's full collections.
    gc.collect()
    gc.freeze()


@signals.worker_ready.connect
def _freeze_the_node(**_: Any) -> None:
    import gc

    # The node's main process takes every batch: what exists once it is up (Celery's worker,
    # its blueprints, kombu, the app) lives as long as it does, and a full collection that
    # walked it all would hold every batch behind it.
    gc.collect()
    gc.freeze()


def _install() -> None:
    from worker.node import BatchIntake

    app.steps["consumer"].add(BatchIntake)
    # Registered on import, not only when a worker starts: eager tests find them in app.tasks.
    app.loader.import_default_modules()


_install()
