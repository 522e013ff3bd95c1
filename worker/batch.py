"""The batch consumer: takes up to N commands from the queue at once and applies them together.

Each process loops: wait for the queue (`BLMOVE q q RIGHT RIGHT`, which removes nothing),
take up to `batch_size` messages atomically into kombu's unacked set (worker/transport.py),
apply them as one transaction (worker/apply.py), store each outcome in the result backend
exactly as Celery does, send Celery task events for Flower, and only then acknowledge.
A process killed at any instant leaves its messages in the unacked set, from which any
consumer (this one or a Celery worker) restores them after the visibility timeout.
"""

from __future__ import annotations

import base64
import gc
import logging
import multiprocessing
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import orjson
import redis
from celery.utils.time import utcoffset
from kombu.connection import Connection
from sqlalchemy import exc as sa_exc

from worker import apply, db, intake, transport
from worker.config import Settings, broker_url, get_settings, result_backend_url
from worker.errors import Undecodable
from worker.protocol import UndecodableMessage, decode, loads
from worker.security import redact, redact_args

logger = logging.getLogger(__name__)

RESULT_KEY = "celery-task-meta-{}"
# About 300 ms of hashing: a run of signups is answered as it goes, and the per-transaction
# cost stays about 1% of the hashing.
HASHES_PER_TRANSACTION = 16


@dataclass
class Received:
    """A message taken from the queue and the command made of it."""

    delivery_tag: str | None
    command: apply.Command
    received_at: float = field(default_factory=time.time)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def result_meta(command: apply.Command) -> dict[str, Any]:
    """The result-backend record Celery would store for `command`'s outcome."""
    meta: dict[str, Any] = {"task_id": command.task_id, "traceback": None, "children": [],
                            "date_done": _now_iso()}
    if command.rejection is not None:
        meta.update(status="FAILURE", result={
            "exc_type": type(command.rejection).__name__,
            "exc_message": list(command.rejection.args),
            "exc_module": type(command.rejection).__module__,
        })
    else:
        meta.update(status="SUCCESS", result=command.result)
    return meta


def to_command(raw: bytes, deliveries: int) -> Received:
    """The command in a taken message; an undecodable one carries its rejection."""
    try:
        message = decode(raw)
    except UndecodableMessage as error:
        try:
            envelope = loads(raw)
            tag = envelope["properties"]["delivery_tag"]
            headers = envelope.get("headers") or {}
        except (ValueError, KeyError, TypeError):
            tag, headers = None, {}
        task_id = headers.get("id") if isinstance(headers.get("id"), str) else None
        task = headers.get("task") if isinstance(headers.get("task"), str) else None
        command = apply.Command(task=task or "", task_id=task_id or "", kwargs=None,
                                rejection=Undecodable(str(error)))
        command.raw = raw
        return Received(tag, command)
    return Received(message.delivery_tag, apply.Command(
        task=message.task, task_id=message.task_id, kwargs=message.kwargs, args=message.args,
        deliveries=deliveries, raw=raw))


class TaskEvents:
    """A batch's Celery task events, sent as Celery's dispatcher sends buffered ones.

    That is one `task.multi` message holding every event of the batch, on the events
    exchange. The dispatcher builds each event and then the message through kombu (some
    30 µs a command here, a fifth of this process's work on a command); here each event is a
    dict and the message is the one kombu made for the dispatcher's first, with this batch's
    events as its body and a delivery tag of its own.
    """

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher
        with transport.collecting_publishes(dispatcher.producer) as publishes:
            dispatcher.publish("task-multi", {}, dispatcher.producer)
        ((self.channel, payload),) = publishes
        self.template = orjson.loads(payload)
        if self.template["properties"].get("body_encoding") != "base64":
            raise ValueError("kombu no longer base64-encodes event bodies on Redis")
        self.pid = os.getpid()
        self.pending: list[dict[str, Any]] = []

    def add(self, kind: str, task_id: str, **fields: Any) -> None:
        """One task event, as the dispatcher's `send(kind, uuid=task_id, **fields)` makes it."""
        self.pending.append({"hostname": self.dispatcher.hostname, "utcoffset": utcoffset(),
                             "pid": self.pid, "clock": self.dispatcher.clock.forward(),
                             "uuid": task_id, **fields, "timestamp": time.time(),
                             "type": kind})

    def take(self) -> list[tuple[str, bytes]]:
        """The pending events as (channel, message) pairs to PUBLISH (none or one), forgotten."""
        if not self.pending:
            return []
        body = base64.b64encode(orjson.dumps(self.pending)).decode()
        self.pending = []
        properties = {**self.template["properties"], "delivery_tag": str(uuid.uuid4())}
        return [(self.channel, orjson.dumps({**self.template, "body": body,
                                             "properties": properties}))]


class BatchConsumer:
    """One consuming process: fetch a batch, apply it, store outcomes, acknowledge."""

    def __init__(self, settings: Settings, batch_size: int, events: bool = True,
                 peers: int = 1) -> None:
        self.settings = settings
        self.queue = settings.commands_queue
        self.batch_size = batch_size
        self.peers = peers
        self.broker = redis.Redis.from_url(
            broker_url(settings), socket_timeout=15, socket_connect_timeout=10,
            socket_keepalive=True, health_check_interval=10, retry_on_timeout=True)
        backend = result_backend_url(settings)
        self.results = (self.broker if backend == broker_url(settings) else
                        redis.Redis.from_url(backend, socket_timeout=15,
                                             socket_connect_timeout=10))
        self.take_script = self.broker.register_script(transport.TAKE_SCRIPT)
        self.finish_script = self.results.register_script(transport.FINISH_SCRIPT)
        self.keys = transport.take_keys(self.queue)
        self.hostname = f"batch-{os.getpid()}@{socket.gethostname()}"
        self.kombu = Connection(
            broker_url(settings), transport="worker.transport:Transport",
            transport_options={
                "visibility_timeout": settings.broker_visibility_timeout,
                "unacked_mutex_expire": transport.unacked_mutex_expire(
                    settings.broker_visibility_timeout)})
        self.events = None
        self.task_events: TaskEvents | None = None
        if events:
            from worker.celery_app import app

            self.events = app.events.Dispatcher(
                connection=self.kombu, hostname=self.hostname, groups=["task", "worker"])
            self.task_events = TaskEvents(self.events)
        self.stopping = False
        # What the last finish took along for the next batch (`_finish_and_take`):
        # (items, quarantined).
        self._taken: tuple[list[tuple[bytes, int]], int] | None = None
        self.processed = 0
        self._restored_at = 0.0
        self._heartbeat_at = 0.0

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        """Consume until `stop()`; the batch in hand (or taken along) is always finished first."""
        transport.set_quarantine_handler(intake.record_queue_item)
        self._event("worker-online")
        while not self.stopping or self._taken is not None:
            try:
                self._housekeeping()
                taken = self.fetch(timeout=1)
                if taken:
                    self.handle(taken)
            except (redis.ConnectionError, redis.TimeoutError) as error:
                logger.warning("broker unreachable (%s); retrying", type(error).__name__)
                time.sleep(1 + random.random())  # noqa: S311 - jitter
        self._event("worker-offline")

    def stop(self) -> None:
        """Finish the batch in hand, then return from `run`."""
        self.stopping = True

    def fetch(self, timeout: int) -> list[Received]:
        """Up to `batch_size` messages, atomically moved into the unacked set.

        The ones the last batch's finish took along come first; stopping, nothing more.
        """
        if self._taken is not None:
            (items, quarantined), self._taken = self._taken, None
        elif self.stopping:
            return []
        else:
            items, quarantined = self._take()
        if not items and not quarantined and not self.stopping:
            # Nothing waiting: block until something is (BLMOVE q q removes nothing).
            if self.broker.blmove(self.queue, self.queue, timeout, "RIGHT", "RIGHT") is None:
                return []
            items, quarantined = self._take()
        if quarantined:
            transport.drain_quarantine_quietly(self.broker, self.queue)
        return [to_command(raw, deliveries) for raw, deliveries in items]

    def _take(self) -> tuple[list[tuple[bytes, int]], int]:
        return transport.parse_taken(self.take_script(keys=self.keys, args=self._take_args()))

    def _take_args(self) -> list[Any]:
        return [time.time(), self.settings.max_payload_bytes, self.batch_size, self.peers]

    def handle(self, received: Sequence[Received]) -> None:
        """Apply a batch, store its outcomes and events, then acknowledge it.

        Commands that carry a password are slow (a hash each, ~18 ms): a batch holding more
        than HASHES_PER_TRANSACTION of them is applied in several transactions, in order, each
        answered and acknowledged when it commits.
        """
        start = 0
        while start < len(received):
            end, hashes = start, 0
            while end < len(received) and (hashes < HASHES_PER_TRANSACTION
                                           or not apply.needs_hash(received[end].command)):
                hashes += apply.needs_hash(received[end].command)
                end += 1
            self._handle_transaction(received[start:end], last=end == len(received))
            start = end

    def _handle_transaction(self, received: Sequence[Received], last: bool = True) -> None:
        """Apply commands as one transaction, store their outcomes and events, acknowledge."""
        for item in received:
            self._task_event("task-received", item.command, name=item.command.task,
                             args=repr(redact_args(item.command.args)),
                             kwargs=repr(redact(item.command.kwargs)),
                             retries=0)
        started = time.monotonic()
        try:
            self._apply_with_retries([item.command for item in received])
            done = list(received)
        except Exception:
            # A bug, not a fault of the input: apply the commands one by one so that only
            # the one that trips it stays unacknowledged (redelivered, then dead-lettered
            # once MAX_DELIVERIES is reached) and the rest of the batch is not held hostage.
            logger.exception("a batch of %d failed; applying its commands one by one",
                             len(received))
            done = []
            for item in received:
                try:
                    self._apply_with_retries([item.command])
                    done.append(item)
                except Exception:
                    logger.exception("command %s failed; left for redelivery",
                                     item.command.task_id)
        runtime = time.monotonic() - started
        tags = [item.delivery_tag for item in done if item.delivery_tag]
        # With results on the broker's Redis, outcomes and acknowledgment go in one script call.
        together = self.results is self.broker
        self._store_outcomes([item.command for item in done], runtime, tags if together else [],
                             take_next=last)
        if not together:
            self._ack(tags)
        self.processed += len(done)

    # --- steps --------------------------------------------------------------------------

    def _apply_with_retries(self, commands: list[apply.Command]) -> None:
        attempt = 0
        while True:
            try:
                apply.run_batch(commands)
                return
            except sa_exc.SQLAlchemyError as error:
                if not apply.is_transient(error):
                    raise
                attempt += 1
                if attempt > self.settings.max_retries:
                    self._exhaust(commands, f"gave up after {attempt - 1} retries: "
                                            f"{type(error).__name__}")
                    return
                delay = min(self.settings.retry_backoff_max, 0.1 * 2**attempt)
                logger.warning("transient fault (%s); batch of %d retried in %.1f s",
                               type(error).__name__, len(commands), delay)
                time.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - jitter

    def _exhaust(self, commands: list[apply.Command], detail: str) -> None:
        pending = [c for c in commands if c.result is None and c.rejection is None]
        while pending:
            try:
                for command in list(pending):
                    apply.record_exhausted(command, detail)
                    pending.remove(command)
            except sa_exc.SQLAlchemyError:
                # Not recorded yet: the messages stay unacknowledged until it is.
                time.sleep(self.settings.retry_backoff_max)

    def _store_outcomes(self, commands: Sequence[apply.Command], runtime: float,
                        ack_tags: Sequence[str] = (), take_next: bool = False) -> None:
        """Store each outcome (and publish it), acknowledge `ack_tags`, send the task events.

        With results on the broker's Redis, that is one FINISH_SCRIPT call, atomic: the
        messages are acknowledged exactly when their outcomes are stored; with `take_next`,
        the next batch is taken in the same round trip.
        """
        share = runtime / max(1, len(commands))
        for command in commands:
            if command.rejection is not None:
                self._task_event("task-failed", command, exception=repr(command.rejection),
                                 traceback=None)
            else:
                self._task_event("task-succeeded", command, result=repr(command.result),
                                 runtime=share)
        results = [(RESULT_KEY.format(command.task_id), orjson.dumps(result_meta(command)))
                   for command in commands if command.task_id]
        together = self.results is self.broker
        publishes = self.task_events.take() if self.task_events is not None else []
        keys, args = transport.finish_arguments(self.queue, results,
                                                self.settings.result_expires, list(ack_tags),
                                                publishes if together else [])
        if (together and take_next and not self.stopping and self._taken is None
                and self._finish_and_take(keys, args)):
            return
        while True:
            try:
                self.finish_script(keys=keys, args=args, client=self.results)
                break
            except (redis.ConnectionError, redis.TimeoutError):
                if self.stopping:
                    # Unacknowledged, so redelivered later and answered as duplicates.
                    logger.warning("result backend unreachable while stopping: giving up")
                    return
                logger.warning("result backend unreachable; retrying")
                time.sleep(1)
        if not together:  # the results are on another Redis: events go on their own
            for channel, message in publishes:
                try:
                    self.broker.publish(channel, message)
                except redis.RedisError:
                    logger.debug("could not send the task events", exc_info=True)

    def _finish_and_take(self, keys: list[str], args: list[Any]) -> bool:
        """FINISH_SCRIPT, and TAKE_SCRIPT for the next batch, in one round trip.

        True when the finish ran (what the take got is kept for `fetch`); False when it must
        be sent again (the connection failed: a take that ran meanwhile leaves its messages
        unacknowledged, restored after the visibility timeout).
        """
        pipe = self.broker.pipeline(transaction=False)
        pipe.evalsha(self.finish_script.sha, len(keys), *keys, *args)
        pipe.evalsha(self.take_script.sha, len(self.keys), *self.keys, *self._take_args())
        try:
            finished, taken = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError):
            return False
        if not isinstance(taken, Exception):
            self._taken = transport.parse_taken(taken)
        return not isinstance(finished, Exception)  # NOSCRIPT (a restarted Redis): again

    def _ack(self, tags: Sequence[str]) -> None:
        if not tags:
            return
        while True:
            try:
                pipe = self.broker.pipeline(transaction=True)
                self._ack_into(pipe, tags)
                pipe.execute()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if self.stopping:
                    logger.warning("broker unreachable while stopping: left unacknowledged")
                    return
                logger.warning("broker unreachable while acknowledging; retrying")
                time.sleep(1)

    def _ack_into(self, pipe: Any, tags: Sequence[str]) -> None:
        pipe.zrem("unacked_index", *tags)
        pipe.hdel("unacked", *tags)
        pipe.hdel(transport.deliveries_key(self.queue), *tags)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        interval = max(1, min(10, self.settings.broker_visibility_timeout // 4))
        if now - self._restored_at >= interval:
            self._restored_at = now
            try:
                # kombu's own sweep (with its mutex): messages of dead consumers go back.
                self.kombu.default_channel.qos.restore_visible(num=1000, interval=1)
            except Exception:
                logger.warning("could not look for unacknowledged messages", exc_info=True)
                self.kombu.collect()
            # Items another consumer quarantined but could not record (or left to us).
            transport.drain_quarantine_quietly(self.broker, self.queue)
        if now - self._heartbeat_at >= 2:
            self._heartbeat_at = now
            self._event("worker-heartbeat", freq=2.0, active=0, processed=self.processed)

    # --- events -------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> None:
        if self.events is None:
            return
        try:
            self.events.send(kind, sw_ident="command-worker-batch", sw_ver="1",
                             sw_sys=os.uname().sysname, **fields)
        except Exception:
            logger.debug("could not send %s", kind, exc_info=True)

    def _task_event(self, kind: str, command: apply.Command, **fields: Any) -> None:
        if self.task_events is not None and command.task_id:
            self.task_events.add(kind, command.task_id, **fields)


def _consume_forever(batch_size: int, events: bool, peers: int) -> None:
    """A child process's life: one consumer until SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    db.after_fork()
    db.hold_connection()  # this process applies its batches one after another
    consumer = BatchConsumer(get_settings(), batch_size, events, peers)
    # What exists now (modules, the app, the consumer) lives as long as the process: kept out
    # of the collector, a full collection no longer walks ~100,000 objects (30-40 ms) mid-batch.
    gc.collect()
    gc.freeze()

    def stop(signum: int, frame: FrameType | None) -> None:
        consumer.stop()

    signal.signal(signal.SIGTERM, stop)
    consumer.run()


def consume(concurrency: int, batch_size: int, events: bool = True) -> int:
    """Run `concurrency` consumer processes until SIGTERM/SIGINT; restart any that dies."""
    context = multiprocessing.get_context("fork")
    children: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    def start_one() -> None:
        child = context.Process(target=_consume_forever,
                                args=(batch_size, events, concurrency), daemon=False)
        child.start()
        assert child.pid is not None
        children[child.pid] = child

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for _ in range(concurrency):
            start_one()
        logger.info("consuming %s with %d processes, batches of up to %d",
                    get_settings().commands_queue, concurrency, batch_size)
        while not stopping:
            for pid, child in list(children.items()):
                if not child.is_alive():
                    child.join()
                    del children[pid]
                    logger.warning("consumer %d exited with %s; starting another", pid,
                                   child.exitcode)
                    time.sleep(0.5)
                    start_one()
            time.sleep(0.2)
        for child in children.values():
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        for child in children.values():
            child.join(max(0.1, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)



def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker.batch [--concurrency N] [--batch-size N] [--no-events]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m worker.batch", description=main.__doc__)
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--no-events", action="store_true")
    parser.add_argument("--loglevel", default="INFO")
    options = parser.parse_args(argv)
    logging.basicConfig(level=options.loglevel.upper(),
                        format="%(asctime)s %(levelname)s %(processName)s %(message)s")
    return consume(options.concurrency, options.batch_size, not options.no_events)


if __name__ == "__main__":
    raise SystemExit(main())
