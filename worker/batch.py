"""A batch job: what a pool process does with the messages the node took for it.

The node (worker/node.py) takes messages from Redis in batches and hands each batch to its
pool as one job. The job, in a pool process: turns each message into a command (or its
rejection: undecodable, over-size, invalid), applies them in as few transactions as the rules
allow (worker/apply.py), and then, in one Redis round trip per transaction, stores every
outcome in Celery's result format, publishes the Celery task events and acknowledges the
messages (worker/broker.py FINISH). Commands that carry callbacks, errbacks, a chain or a
chord (or that Celery signal handlers watch) are reported through Celery's own tracer after
their transaction commits, so canvas runs exactly as Celery runs it.

A job never raises: every message ends settled (an outcome stored and acknowledged) or is
returned as `left` for the node to put back on the queue (counted as a delivery), and a
message that keeps failing is dead-lettered once its deliveries exceed MAX_DELIVERIES.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import orjson
from billiard.exceptions import SoftTimeLimitExceeded
from celery import signals
from celery.utils.time import utcoffset
from sqlalchemy import exc as sa_exc

from worker import apply, db, deadletters, protocol
from worker.broker import QueueKeys, Scripts, Taken, finish_arguments
from worker.config import get_settings
from worker.errors import (
    CommandRejected,
    Invalid,
    RetriesExhausted,
    TimeLimitExceeded,
    Undecodable,
)
from worker.security import printable, safe_repr

logger = logging.getLogger(__name__)

RESULT_KEY = "celery-task-meta-{}"
# About 300 ms of hashing at the default cost: a run of sign-ups is answered as it goes, and
# the per-transaction cost stays about 1% of the hashing.
HASHES_PER_TRANSACTION = 16

_Item = TypeVar("_Item")


def by_hashes(items: Sequence[_Item], hashes: Callable[[_Item], bool]
              ) -> list[list[_Item]]:
    """`items` in order, in groups of at most HASHES_PER_TRANSACTION that `hashes` (and any
    number that do not)."""
    groups: list[list[_Item]] = []
    current: list[_Item] = []
    count = 0
    for item in items:
        hashing = hashes(item)
        if hashing and count >= HASHES_PER_TRANSACTION:
            groups.append(current)
            current, count = [], 0
        current.append(item)
        count += hashing
    if current:
        groups.append(current)
    return groups


#: What the node decided about a message before handing it on.
APPLY, REVOKED, EXPIRED = "apply", "revoked", "expired"


class Received(NamedTuple):
    """A taken message, when the node took it, and whether it is to be applied."""

    message: Taken
    received_at: float
    verdict: str = APPLY


@dataclass(frozen=True, slots=True)
class Job:
    """One pool job: messages of one queue, taken together."""

    keys: QueueKeys
    node: str
    items: tuple[Received, ...]
    events: bool = True
    #: Seconds the job's one command may take (its soft time limit), if it has one.
    time_limit: float | None = None

    def __repr__(self) -> str:
        # Pools log their jobs' arguments at DEBUG: never a message's content.
        return f"<batch of {len(self.items)} from {self.keys.queue!r}>"


@dataclass(eq=False)
class Delivery:
    """One message in a job: the command made of it, and what is known to report it."""

    received: Received
    command: apply.Command
    headers: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    embed: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0
    runtime: float = 0.0
    traced: bool = False

    @property
    def message(self) -> Taken:
        return self.received.message

    @property
    def revoked(self) -> bool:
        return self.received.verdict != APPLY

    @property
    def ignore_result(self) -> bool:
        return self.headers.get("ignore_result") is True

    @property
    def has_canvas(self) -> bool:
        return any(self.embed.get(name) for name in ("callbacks", "errbacks", "chain", "chord"))


def receive(received: Received, limit: int) -> Delivery:
    """The command in a taken message; one that cannot be decoded carries its rejection."""
    message = received.message
    if message.raw is None:
        task_id, task = protocol.identity(None, message.tail)
        command = apply.Command(task=task or "", task_id=task_id, kwargs=None,
                                rejection=Invalid(f"message of {message.size} bytes exceeds "
                                                  f"the limit of {limit} bytes"),
                                evidence=deadletters.RawEvidence(None, message.size, None))
        return Delivery(received, command)
    try:
        decoded = protocol.decode(message.raw, limit)
    except protocol.UndecodableMessage as error:
        task_id, task = protocol.identity(message.raw)
        rejection: CommandRejected = (Invalid(str(error)) if isinstance(error, protocol.OverLimit)
                                      else Undecodable(str(error)))
        command = apply.Command(task=task or "", task_id=task_id, kwargs=None,
                                rejection=rejection, raw=message.raw,
                                evidence=deadletters.raw_evidence(message.raw))
        return Delivery(received, command)
    command = apply.Command(task=decoded.task, task_id=decoded.task_id,
                            kwargs=decoded.kwargs, args=decoded.args,
                            deliveries=message.deliveries, raw=message.raw)
    delivery = Delivery(received, command, decoded.headers, decoded.properties, decoded.embed)
    if received.verdict == APPLY:
        command.rejection = _header_problem(decoded)
    return delivery


def _header_problem(message: protocol.Message) -> CommandRejected | None:
    """What makes a decodable message invalid before its arguments are even looked at."""
    if message.nesting_bound > protocol.MAX_DEPTH and (
            protocol.depth(message.args) > protocol.MAX_DEPTH
            or protocol.depth(message.kwargs) > protocol.MAX_DEPTH):
        return Invalid(f"arguments nested deeper than {protocol.MAX_DEPTH} levels")
    for name in ("eta", "expires"):
        try:
            protocol.parse_time(message.headers.get(name))
        except ValueError:
            return Invalid(f"the {name} header is not an ISO 8601 date and time")
    problem = protocol.canvas_problem(message.embed)
    return Invalid(problem) if problem is not None else None


# --- applying -------------------------------------------------------------------------------

class TimedOut(Exception):
    """PostgreSQL stopped a command's transaction at its time limit (see db.time_limit)."""


#: What PostgreSQL answers when a statement or a lock wait outlasts its timeout.
_TIMEOUTS = frozenset({"57014", "55P03"})


def apply_commands(commands: list[apply.Command],
                   on_retry: Any = None) -> None:
    """Apply commands as one transaction, retrying transient faults in place.

    After MAX_RETRIES the commands still without an outcome are dead-lettered as
    `retries_exhausted` (waiting, if need be, until the database takes the dead letters).
    `on_retry(error)` is called before each retry. Other errors are raised.
    """
    settings = get_settings()
    attempt = 0
    while True:
        try:
            apply.run_batch(commands)
            return
        except sa_exc.SQLAlchemyError as error:
            if db.time_limit_in_force() and getattr(
                    getattr(error, "orig", None), "pgcode", None) in _TIMEOUTS:
                raise TimedOut from error
            if not apply.is_transient(error):
                raise
            attempt += 1
            if attempt > settings.max_retries:
                _exhaust(commands, f"gave up after {attempt - 1} retries: "
                                   f"{type(error).__name__}")
                return
            if on_retry is not None:
                on_retry(error)
            delay = min(settings.retry_backoff_max, 0.1 * 2**attempt)
            logger.warning("transient fault (%s); %d command(s) retried in %.1f s",
                           type(error).__name__, len(commands), delay)
            time.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - jitter


def _exhaust(commands: list[apply.Command], detail: str,
             rejection: type[RetriesExhausted] = RetriesExhausted) -> None:
    pending = [c for c in commands if c.result is None and c.rejection is None]
    while pending:
        try:
            for command in list(pending):
                # Recorded whatever time the command had: its limit was for applying it.
                with db.no_time_limit():
                    apply.record_exhausted(command, detail, rejection)
                pending.remove(command)
        except sa_exc.SQLAlchemyError:
            # Not recorded yet: the messages stay unacknowledged until it is.
            time.sleep(get_settings().retry_backoff_max)


# --- reporting ------------------------------------------------------------------------------

def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def result_repr(result: Any, limit: int = 1024) -> str:
    """A result as its task-succeeded event shows it (as Celery's `saferepr`, cut to `limit`).

    No redaction: a result is the record as stored, which never holds a password or hash.
    """
    shown = repr(result)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


def failure_traceback(error: BaseException) -> str:
    """The traceback Celery stores with a failure (the exception line when never raised)."""
    if error.__traceback__ is not None:
        return "".join(traceback.format_exception(error))
    return "".join(traceback.format_exception_only(error))


def _exception_meta(error: BaseException) -> dict[str, Any]:
    """An exception as Celery's JSON result serializer stores it."""
    return {"exc_type": type(error).__name__, "exc_message": list(error.args),
            "exc_module": type(error).__module__}


def result_meta(delivery: Delivery, done: str | None = None) -> dict[str, Any]:
    """The result-backend record Celery would store for `delivery`'s outcome (`done`: when,
    in ISO 8601; now by default)."""
    command = delivery.command
    meta: dict[str, Any] = {"task_id": command.task_id, "traceback": None, "children": [],
                            "date_done": done or _now_iso()}
    if delivery.revoked:
        from celery.exceptions import TaskRevokedError

        meta.update(status="REVOKED", result=_exception_meta(
            TaskRevokedError(delivery.received.verdict)))
    elif command.rejection is not None:
        meta.update(status="FAILURE", result=_exception_meta(command.rejection),
                    traceback=failure_traceback(command.rejection))
    else:
        meta.update(status="SUCCESS", result=command.result)
    return meta


class TaskEvents:
    """A batch's Celery task events, sent as Celery's dispatcher sends buffered ones.

    That is one `task.multi` message holding every event of the batch, on the events
    exchange. The dispatcher builds each event and then the message through kombu; here each
    event is a dict and the message is the one kombu made for the dispatcher's first, with
    the batch's events as its body and a delivery tag of its own.
    """

    def __init__(self, dispatcher: Any) -> None:
        from worker.transport import collecting_publishes

        self.dispatcher = dispatcher
        with collecting_publishes(dispatcher.producer) as publishes:
            dispatcher.publish("task-multi", {}, dispatcher.producer)
        ((self.channel, payload),) = publishes
        self.template = orjson.loads(payload)
        if self.template["properties"].get("body_encoding") != "base64":
            raise ValueError("kombu no longer base64-encodes event bodies on Redis")
        self.pid = os.getpid()
        self.pending: list[dict[str, Any]] = []
        self.offset: int | None = None

    def add(self, kind: str, task_id: str, timestamp: float | None = None,
            **fields: Any) -> None:
        """One task event, as the dispatcher's `send(kind, uuid=task_id, **fields)` makes it."""
        if self.offset is None:
            self.offset = utcoffset()  # once per batch: it changes only with the clocks
        self.pending.append({"hostname": self.dispatcher.hostname, "utcoffset": self.offset,
                             "pid": self.pid, "clock": self.dispatcher.clock.forward(),
                             "uuid": task_id, **fields,
                             "timestamp": timestamp if timestamp is not None else time.time(),
                             "type": kind})

    def take(self) -> list[tuple[str, bytes]]:
        """The pending events as (channel, message) pairs to PUBLISH (none or one), forgotten."""
        if not self.pending:
            return []
        pending, self.pending = self.pending, []
        try:
            body = base64.b64encode(orjson.dumps(pending, default=str)).decode()
        except orjson.JSONEncodeError:
            # Events are told on a best-effort basis; outcomes must be stored and acknowledged
            # whatever an event holds, or the batch would come back again and again.
            logger.error("%d task event(s) could not be encoded and were not sent",
                         len(pending))
            return []
        properties = {**self.template["properties"], "delivery_tag": str(uuid.uuid4())}
        return [(self.channel, orjson.dumps({**self.template, "body": body,
                                             "properties": properties}))]


_SIGNALS = (signals.task_prerun, signals.task_postrun, signals.task_success,
            signals.task_failure)


class BatchRunner:
    """What one pool process keeps between jobs: its Redis clients, scripts and events."""

    def __init__(self, node: str, events: bool) -> None:
        from worker.celery_app import app

        self.app = app
        # The registry itself (app.tasks is a property that takes a lock at every read).
        self.tasks: dict[str, Any] = app.tasks
        self.settings = get_settings()
        self.node = node
        self.connection = app.connection_for_write()
        channel = self.connection.default_channel
        self.broker = channel.scripts_client()
        self.scripts = Scripts(self.broker)
        backend = app.backend
        self.backend = backend
        self.results_on_broker = False
        self.results_client: Any = None
        if _is_redis_backend(backend):
            if app.conf.result_backend == app.conf.broker_url:
                self.results_on_broker = True
                self.results_client = self.broker
            else:
                self.results_client = backend.client
            self.finish_on_results = self.results_client.register_script(
                self.scripts.finish_script.script)
        #: The events of the job in hand: None while the node sends no task events.
        self.task_events: TaskEvents | None = None
        #: When the job's command must have ended (its time limit), on the monotonic clock.
        self.deadline: float | None = None
        #: Events sent ahead whose replies are still to be read: (connection, how many).
        self._sending: tuple[Any, int] | None = None
        self._events: TaskEvents | None = None
        if events:
            self.events_for(node)

    def events_for(self, node: str) -> TaskEvents:
        """This process's task events (made at the first job that sends them)."""
        if self._events is None:
            dispatcher = self.app.events.Dispatcher(connection=self.connection, hostname=node,
                                                    groups=["task"])
            self._events = TaskEvents(dispatcher)
        return self._events

    # --- the job ---------------------------------------------------------------------------

    def run(self, job: Job) -> tuple[str, ...]:
        """Apply, report and acknowledge the job's messages; the tags left unsettled."""
        # Each job says whether the node sends task events now (enable/disable_events).
        self.task_events = self.events_for(job.node) if job.events else None
        self.deadline = (time.monotonic() + job.time_limit if job.time_limit is not None
                         else None)
        limit = self.settings.max_payload_bytes
        deliveries: list[Delivery] = []
        left: list[Taken] = []
        for item in job.items:
            try:
                deliveries.append(receive(item, limit))
            except Exception:
                logger.exception("message %s could not be read; it goes back on the queue",
                                 item.message.tag)
                left.append(item.message)
        try:
            # Commands that hash a password are slow: no more than HASHES_PER_TRANSACTION of
            # them per transaction, each group answered and acknowledged when it commits.
            for group in by_hashes(deliveries, lambda delivery: apply.needs_hash(
                    delivery.command)):
                left += self._settle(job, group)
        finally:
            self._published()
        return tuple(message.tag for message in left)

    def _settle(self, job: Job, deliveries: Sequence[Delivery]) -> list[Taken]:
        """Apply one transaction's worth of deliveries, then report and acknowledge them.

        Each command's runtime is its own: its validation (and password hash), then the
        transaction it commits in.
        """
        events = self.task_events
        applying = [d for d in deliveries if not d.revoked]
        for delivery in applying:
            command = delivery.command
            delivery.started_at = time.time()
            if command.key is None and command.rejection is None and command.result is None:
                try:
                    apply.prepare(command)
                except Exception:
                    logger.exception("command %s could not be validated", delivery.message.tag)
            delivery.runtime = time.time() - delivery.started_at
            if events is not None and command.task_id and not delivery.message.announced:
                headers = delivery.headers
                events.add("task-received", command.task_id,
                           timestamp=delivery.received.received_at,
                           name=printable(command.task),
                           args=safe_repr(command.args, positional=True),
                           kwargs=safe_repr(command.kwargs),
                           root_id=_shown_header(headers.get("root_id")),
                           parent_id=_shown_header(headers.get("parent_id")),
                           retries=_retries(headers.get("retries")),
                           eta=_shown_header(headers.get("eta")),
                           expires=_shown_header(headers.get("expires")))
            if events is not None and command.task_id:
                events.add("task-started", command.task_id, timestamp=delivery.started_at,
                           pid=os.getpid())
        if events is not None:
            # Sent now, as a worker sends them: a monitor sees the commands running.
            self._publish(events.take())
        began = time.time()
        done, left = self._apply(applying)
        spent = time.time() - began
        for delivery in done:
            delivery.runtime += spent
        settled = [d for d in deliveries if d.revoked] + done
        traced = [d for d in settled if self._needs_tracer(d)]
        for delivery in traced:
            self._trace(delivery)
        self._report(job, settled)
        return [delivery.message for delivery in left]

    def _apply(self, deliveries: list[Delivery]) -> tuple[list[Delivery], list[Delivery]]:
        """(settled, left): apply as one transaction; after an unexpected error, one by one."""
        if not deliveries:
            return [], []

        def retried(error: BaseException) -> None:
            if self.task_events is None:
                return
            for delivery in deliveries:
                if delivery.command.task_id:
                    self.task_events.add("task-retried", delivery.command.task_id,
                                         exception=repr(type(error).__name__), traceback=None)

        try:
            if self.deadline is None:
                apply_commands([d.command for d in deliveries], on_retry=retried)
            else:
                with db.time_limit(max(0.001, self.deadline - time.monotonic())):
                    apply_commands([d.command for d in deliveries], on_retry=retried)
            return deliveries, []
        except (SoftTimeLimitExceeded, TimedOut):
            if len(deliveries) > 1:
                # The worker's time limit, on a whole batch: back on the queue, where each
                # comes again alone (counted) and only the slow one meets the limit.
                logger.warning("a batch of %d outlasted the soft time limit; its commands go "
                               "back on the queue, each to be applied alone", len(deliveries))
                return [], deliveries
            (delivery,) = deliveries
            _exhaust([_forgotten(delivery.command)], "the command outlasted its time limit",
                     TimeLimitExceeded)
            return deliveries, []
        except Exception:
            if len(deliveries) == 1:
                logger.exception("command %s failed; left for redelivery",
                                 deliveries[0].message.tag)
                return [], deliveries
            # A bug, not a fault of the input: apply the commands one by one, so that only
            # the one that trips it goes back (redelivered, then dead-lettered once its
            # deliveries exceed MAX_DELIVERIES) and the rest are not held hostage.
            logger.exception("a batch of %d failed; applying its commands one by one",
                             len(deliveries))
        done: list[Delivery] = []
        left: list[Delivery] = []
        for delivery in deliveries:
            _forget(delivery.command)
            single_done, single_left = self._apply([delivery])
            done += single_done
            left += single_left
        return done, left

    def _needs_tracer(self, delivery: Delivery) -> bool:
        """Whether Celery's tracer must report this one: canvas, or signal handlers to call."""
        if not delivery.command.task_id or delivery.command.task not in self.tasks:
            return False
        if delivery.has_canvas and protocol.canvas_problem(delivery.embed) is None:
            return True
        return any(signal.receivers for signal in _SIGNALS) and not delivery.revoked

    def _trace(self, delivery: Delivery) -> None:
        """Report through Celery's tracer: it stores the result, runs callbacks and chords."""
        from worker.commands import SETTLED

        command = delivery.command
        assert command.task_id is not None
        request = {**delivery.headers, **delivery.embed,
                   "argsrepr": safe_repr(command.args, positional=True),
                   "kwargsrepr": safe_repr(command.kwargs),
                   "properties": delivery.properties,
                   "reply_to": delivery.properties.get("reply_to"),
                   "correlation_id": delivery.properties.get("correlation_id"),
                   "delivery_info": {"exchange": "", "routing_key": delivery.message.queue,
                                     "priority": delivery.properties.get("priority"),
                                     "redelivered": delivery.message.deliveries > 1},
                   "hostname": self.node, "is_eager": False}
        task = self.tasks[command.task]
        try:
            if delivery.revoked:
                from celery.app.task import Context

                self.backend.mark_as_revoked(command.task_id, delivery.received.verdict,
                                             request=Context(request),
                                             store_result=not delivery.ignore_result)
            else:
                SETTLED[command.task_id] = command
                try:
                    task.__trace__(command.task_id, command.args, command.kwargs, request)
                finally:
                    SETTLED.pop(command.task_id, None)
            delivery.traced = True
        except Exception:
            # The outcome is committed: report it the lean way rather than not at all.
            logger.exception("Celery's tracer failed on %s; its result is stored directly",
                             command.task_id)

    def _report(self, job: Job, settled: Sequence[Delivery]) -> None:
        """Store outcomes, publish events and acknowledge, in one round trip when possible."""
        self._published()  # the early events, before the outcomes
        events = self.task_events
        results: list[tuple[str, bytes]] = []
        done = _now_iso()
        for delivery in settled:
            command = delivery.command
            if events is not None and command.task_id:
                if delivery.revoked:
                    events.add("task-revoked", command.task_id, terminated=False, signum=None,
                               expired=delivery.received.verdict == EXPIRED)
                elif command.rejection is not None:
                    events.add("task-failed", command.task_id,
                               exception=safe_repr(command.rejection),
                               traceback=failure_traceback(command.rejection))
                else:
                    events.add("task-succeeded", command.task_id,
                               result=result_repr(command.result), runtime=delivery.runtime)
            if command.task_id and not delivery.traced and not delivery.ignore_result:
                results.append((RESULT_KEY.format(command.task_id),
                                orjson.dumps(result_meta(delivery, done), default=str)))
        publishes = events.take() if events is not None else []
        messages = [delivery.message for delivery in settled]
        if self.results_client is None:
            self._store_elsewhere([d for d in settled if d.command.task_id and not d.traced
                                   and not d.ignore_result])
            results = []
        if self.results_on_broker:
            keys, args = finish_arguments(job.keys, results, self.settings.result_expires,
                                          messages, publishes)
            self._call(self.finish_on_results, keys, args)
            return
        if results:
            keys, args = finish_arguments(job.keys, results, self.settings.result_expires,
                                          [], [])
            self._call(self.finish_on_results, keys, args, client=self.results_client)
        keys, args = finish_arguments(job.keys, [], self.settings.result_expires, messages,
                                      publishes)
        self._call(self.scripts.finish_script, keys, args)

    def _publish(self, publishes: list[tuple[str, bytes]]) -> None:
        """Send task events on their own, without waiting: their replies are read later
        (`_published`), so the transaction runs meanwhile. Best effort: a monitor misses
        them, nothing else."""
        if not publishes:
            return
        self._published()
        connection = None
        try:
            connection = self.broker.connection_pool.get_connection()
            for channel, payload in publishes:
                connection.send_command("PUBLISH", channel, payload)
            self._sending = (connection, len(publishes))
        except Exception:
            logger.warning("could not send task events", exc_info=True)
            if connection is not None:
                connection.disconnect()
                self.broker.connection_pool.release(connection)

    def _published(self) -> None:
        """Read the replies of the events `_publish` sent, and give their connection back."""
        if self._sending is None:
            return
        connection, count = self._sending
        self._sending = None
        try:
            for _ in range(count):
                connection.read_response()
        except Exception:
            logger.warning("could not send task events", exc_info=True)
            connection.disconnect()
        finally:
            self.broker.connection_pool.release(connection)

    def _store_elsewhere(self, deliveries: Sequence[Delivery]) -> None:
        """Results for a backend that is not Redis: through Celery's backend, one by one."""
        for delivery in deliveries:
            meta = result_meta(delivery)
            self.backend.store_result(delivery.command.task_id, meta["result"], meta["status"],
                                      traceback=meta["traceback"])

    def _call(self, script: Any, keys: list[str], args: list[Any], client: Any = None) -> None:
        """Run a FINISH until Redis takes it (the messages stay unacknowledged meanwhile)."""
        while True:
            try:
                script(keys=keys, args=args, client=client or self.broker)
                return
            except Exception as error:
                import redis

                if not isinstance(error, redis.ConnectionError | redis.TimeoutError):
                    raise
                logger.warning("Redis unreachable while storing outcomes; retrying")
                time.sleep(1)


def _shown_header(value: Any) -> str | None:
    """A header a task event carries, as shown: text only, escaped and without secrets.

    Headers are the producer's: a nested, unencodable or secret-bearing value would stop the
    batch's events from being sent (and so the batch from being acknowledged) or be shown.
    """
    return printable(value) if isinstance(value, str) else None


def _retries(value: Any) -> int:
    """The `retries` header as a task event carries it: a count, 0 when it is none."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    return 0


def _forget(command: apply.Command) -> None:
    """Undo what a rolled-back try left on a command, so that it can be applied afresh."""
    command.result = None
    if command.item is not None and command.rejection is not None:
        command.rejection = None


def _forgotten(command: apply.Command) -> apply.Command:
    _forget(command)
    return command


def _is_redis_backend(backend: Any) -> bool:
    from celery.backends.redis import RedisBackend

    return isinstance(backend, RedisBackend)


#: One runner per process and thread: a prefork child has one; the threads pool, one a thread.
_runners: dict[tuple[int, int], BatchRunner] = {}


def run_job(job: Job) -> tuple[str, ...]:
    """The pool's entry point: run `job`; the tags of messages to put back on the queue.

    Never raises: a failure of the job itself leaves every message to be put back.
    """
    owner = (os.getpid(), threading.get_ident())
    try:
        runner = _runners.get(owner)
        if runner is None:
            runner = _runners[owner] = BatchRunner(job.node, job.events)
        return runner.run(job)
    except Exception:
        logger.exception("a batch of %d could not be run; it goes back on the queue",
                         len(job.items))
        _runners.pop(owner, None)
        return tuple(item.message.tag for item in job.items)
