"""The Celery app: JSON only, acks after commit, the commands queue, redacted events."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals
from celery.worker.request import Request
from kombu.entity import Queue

from worker import db
from worker.config import NoServerError, Settings, broker_url, get_settings, result_backend_url
from worker.security import safe_repr
from worker.transport import transport_for, unacked_mutex_expire

logger = logging.getLogger(__name__)

TASK_MODULES = ["tasks.users", "tasks.posts", "tasks.tags"]


class RedactingRequest(Request):
    """A task request whose argument reprs come from the body with secrets removed.

    Producers put `argsrepr`/`kwargsrepr` headers in plain text; the worker's logs, events
    (and so Flower) show them, so they are rebuilt here rather than trusted.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        payload = self._Request__payload
        if isinstance(payload, list | tuple) and len(payload) >= 2:
            self._argsrepr = safe_repr(payload[0], positional=True)
            self._kwargsrepr = safe_repr(payload[1])
        else:
            self._argsrepr = self._kwargsrepr = "<undecoded>"
        self._request_dict["argsrepr"] = self._argsrepr
        self._request_dict["kwargsrepr"] = self._kwargsrepr


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
        # The atomic fetch; "memory://" (eager tests, no broker) keeps kombu's own transport.
        broker_transport=transport_for(broker) if broker else None,
        worker_consumer="worker.intake:Consumer",
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
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        result_expires=settings.result_expires,
        result_extended=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout,
            "max_message_bytes": settings.max_payload_bytes,
            # Look for the messages of dead workers often, not every 100 s.
            "unacked_restore_interval": max(1, min(10, settings.broker_visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": unacked_mutex_expire(settings.broker_visibility_timeout),
            "socket_timeout": 10,
            "socket_connect_timeout": 10,
            "socket_keepalive": True,
            "health_check_interval": 10,
            "retry_on_timeout": True,
            **({"master_name": settings.broker_sentinel_master}
               if settings.broker_sentinel_master else {}),
        },
        result_backend_transport_options={"retry_policy": {"timeout": 10.0}},
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


@signals.worker_init.connect
def _refuse_without_broker(**_: Any) -> None:
    reason = app.conf.get("worker_unconfigured_reason")
    if reason:
        raise SystemExit(f"error: {reason}; set BROKER_URL and DATABASE_URL")


@signals.worker_init.connect
def _record_quarantined_messages(**_: Any) -> None:
    from worker import intake, transport

    transport.set_quarantine_handler(intake.record_queue_item)


@signals.worker_process_init.connect
def _new_pool_after_fork(**_: Any) -> None:
    import gc

    db.after_fork()
    # A prefork child runs one task at a time, in this thread: it keeps its connection.
    db.hold_connection()
    # What exists now lives as long as the child: out of the collector's full collections.
    gc.collect()
    gc.freeze()
