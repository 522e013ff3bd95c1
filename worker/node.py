"""The worker node's intake: Celery's consumer, taking the command queues in batches.

`celery -A worker.celery_app worker` is a stock Celery worker (remote control, events,
heartbeats, mingle, gossip, autoscale, Flower) with one consumer bootstep added,
`BatchIntake`. Instead of one kombu delivery per message, the node waits for a queue, takes a
batch atomically into the queue's unacknowledged set (worker/broker.py), and decides per
message, as Celery's consumer would:

- revoked (`celery.worker.state.revoked`, fed by `revoke` broadcasts, mingle and --statedb;
  or `revoked_stamps`, fed by `revoke_by_stamped_headers`) or expired: not applied, reported
  REVOKED;
- an eta or countdown in the future, or over its task's rate limit: parked in the queue's
  delayed set until due (not held unacknowledged, so no visibility timeout redelivers it);
- otherwise handed to the pool: a batch as one job (worker/batch.py), or alone when it was
  delivered before (so that a message that kills its pool process takes no batch-mates with
  it) or carries a time limit.

Each message is a request in Celery's worker state, so `inspect active/reserved/scheduled/
query_task`, `stats`, heartbeats and autoscale see commands, not batches.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from celery import bootsteps
from celery.exceptions import TimeLimitExceeded
from celery.worker import state as worker_state

from worker import batch, protocol
from worker.broker import Parked, QueueKeys, Scripts, Taken, parked_member
from worker.config import get_settings
from worker.security import printable, safe_repr

logger = logging.getLogger(__name__)

#: Seconds between looks at the delayed sets for messages other nodes parked.
PROMOTE_INTERVAL = 1.0
#: Seconds the pool's soft time limit waits after a command's own (see `_dispatch`).
SOFT_LIMIT_GRACE = 0.5


#: Commands that always hash a password (tens of milliseconds of one core each).
HASHING_TASKS = frozenset({"users.create"})


def _jobs(items: list[tuple[batch.Received, protocol.Head]]
          ) -> list[list[tuple[batch.Received, protocol.Head]]]:
    """A take's messages as pool jobs: one, but for at most HASHES_PER_TRANSACTION sign-ups
    a job, so that slow commands are spread over every process and none waits for its last
    long job while the others idle."""
    return batch.by_hashes(items, lambda item: item[1].task in HASHING_TASKS)


def _backstop(soft: float | None, hard: float | None) -> float | None:
    """The pool's soft limit for a command whose own limit is `soft`: a moment later, and
    before the hard limit."""
    if not soft:
        return None
    grace = SOFT_LIMIT_GRACE if not hard or hard <= soft else min(SOFT_LIMIT_GRACE,
                                                                   (hard - soft) / 2)
    return soft + grace


class CommandRequest:
    """One message taken by the node, as Celery's worker state and inspect replies see it."""

    __slots__ = ("__weakref__", "_hostname", "delivery_info", "eventer", "id", "job", "message",
                 "name", "task", "time_start", "type", "worker_pid")

    acknowledged = False

    def __init__(self, message: Taken, head: protocol.Head, hostname: str,
                 tasks: dict[str, Any]) -> None:
        self.message = message
        self.id = head.task_id
        self.name = self.type = head.task or "(undecodable)"
        self.task = tasks.get(head.task) if head.task else None
        self._hostname = hostname
        self.delivery_info = {"exchange": "", "routing_key": message.queue, "priority": None,
                              "redelivered": message.deliveries > 1}
        self.time_start: float | None = None
        self.worker_pid: int | None = None
        self.job: int | None = None
        #: Set by Celery's Events step on reconnect; events come from the pool processes.
        self.eventer: Any = None

    def info(self, safe: bool = False) -> dict[str, Any]:
        """What `inspect active/reserved/scheduled` show: arguments with secrets removed."""
        args: Any = "<undecoded>"
        kwargs: Any = "<undecoded>"
        if self.message.raw is not None:
            try:
                decoded = protocol.decode(self.message.raw, len(self.message.raw) * 64)
                args = safe_repr(decoded.args, positional=True)
                kwargs = safe_repr(decoded.kwargs)
            except protocol.UndecodableMessage:
                pass
        return {"id": self.id, "name": self.name, "args": args, "kwargs": kwargs,
                "type": self.type, "hostname": self._hostname, "time_start": self.time_start,
                "acknowledged": False, "delivery_info": self.delivery_info,
                "worker_pid": self.worker_pid}

    def terminate(self, pool: Any, signal: Any = None) -> None:
        """Terminate the pool process applying this message (and so its whole batch).

        The batch rolls back; its other messages go back on the queue and are applied each
        alone; this one, revoked, is then reported REVOKED.
        """
        if self.worker_pid is not None:
            pool.terminate_job(self.worker_pid, signal)

    def cancel(self, pool: Any, emit_retry: bool = True) -> None:
        """Nothing to cancel on a lost connection: pool processes acknowledge on their own."""

    @property
    def stamps(self) -> dict[str, Any]:
        """The message's stamps: what `revoke_by_stamped_headers --terminate` matches."""
        return message_stamps(self.message.raw)

    def humaninfo(self) -> str:
        return f"{self.name}[{self.id}]"

    def __str__(self) -> str:
        return self.humaninfo()


def message_stamps(raw: bytes | None) -> dict[str, Any]:
    """A message's stamps ({header: value} for each of its `stamped_headers`); {} if none."""
    if raw is None:
        return {}
    try:
        headers = orjson.loads(raw)["headers"]
        names, stamps = headers.get("stamped_headers") or [], headers.get("stamps") or {}
        return {name: stamps.get(name) for name in names if isinstance(name, str)}
    except Exception:
        return {}


def revoked_by_stamp(stamps: dict[str, Any]) -> bool:
    """Whether `revoke_by_stamped_headers` revoked a message with `stamps` (as Celery's
    `Request.revoked` decides: one stamped value among the revoked ones is enough)."""
    for header, value in stamps.items():
        revoked = worker_state.revoked_stamps.get(header)
        if revoked is None or value is None:
            continue
        wanted = revoked if isinstance(revoked, list | tuple | set) else [revoked]
        values = value if isinstance(value, list | tuple) else [value]
        if any(item in wanted for item in values):
            return True
    return False


class Dispatched:
    """A job handed to the pool, the requests it carries, and the pool's handle on it."""

    __slots__ = ("accepted", "job", "requests", "result")

    def __init__(self, job: batch.Job, requests: list[CommandRequest]) -> None:
        self.job = job
        self.requests = requests
        self.accepted = False
        self.result: Any = None

    def discarded(self) -> bool:
        """Whether the pool dropped the job unrun (billiard's flush, on a lost connection)."""
        result = self.result
        cache = getattr(result, "_cache", None)
        return (cache is not None and not self.accepted and not result.ready()
                and result._job not in cache)


class Intake:
    """Takes batches for the pool, decides per message, and keeps Celery's worker state."""

    def __init__(self, consumer: Any, batch_size: int | None = None) -> None:
        self.c = consumer
        self.app = consumer.app
        # The registry itself (app.tasks is a property that takes a lock at every read).
        self.tasks: dict[str, Any] = consumer.app.tasks
        settings = get_settings()
        self.batch_size = int(batch_size or self.app.conf.get("worker_batch_size") or 100)
        self.max_bytes = settings.max_payload_bytes
        self.visibility_timeout = settings.broker_visibility_timeout
        steps = self.app.conf.broker_transport_options.get("priority_steps")
        self.priority_steps = tuple(steps) if steps else QueueKeys("").priority_steps
        self.scripts: Scripts | None = None
        self.keys: dict[str, QueueKeys] = {}
        self.in_flight: dict[int, Dispatched] = {}
        self.accepting = False
        #: Queues whose last take was full (a node consumes several after add_consumer).
        self._busy: set[str] = set()
        #: Queues whose last take found messages: the next take goes at once, without a wait.
        self._nonempty: set[str] = set()
        self._next_job = 0
        self._promote_timer: Any = None
        self._main_thread = threading.get_ident()

    # --- wiring -----------------------------------------------------------------------------

    def attach(self, channel: Any) -> None:
        """Take over the task consumer's channel (after every connect)."""
        self.scripts = Scripts(channel.scripts_client())
        channel.intake = self
        self.accepting = True

    def detach(self) -> None:
        self.accepting = False

    def queue_keys(self, queue: str) -> QueueKeys:
        keys = self.keys.get(queue)
        if keys is None:
            keys = self.keys[queue] = QueueKeys(queue, self.priority_steps)
        return keys

    def consumed_queues(self) -> list[str]:
        consumer = self.c.task_consumer
        if consumer is None:
            return []
        return [queue.name for queue in consumer.queues]

    def limit(self) -> int:
        """Jobs in flight at most.

        While a queue holds more than a batch (its last take was full), the prefetch count
        (processes x worker_prefetch_multiplier): a batch waits ready for each process, which
        never idles between batches. Otherwise one job per process: a message that arrives
        meanwhile waits in Redis and joins the next, larger batch, taken as a process frees,
        rather than a small one queued behind the batch in hand.
        """
        processes = max(1, int(self.c.pool.num_processes or 1))
        if not self._busy:
            return processes
        qos = self.c.qos
        value = qos.value if qos is not None else 0
        return max(processes, int(value or processes))

    def has_capacity(self) -> bool:
        return self.accepting and len(self.in_flight) < self.limit()

    # --- taking -----------------------------------------------------------------------------

    def take(self, queue: str) -> bool:
        """Take a batch from `queue` and hand it on; whether anything was taken."""
        request = self.take_request(queue)
        if request is None or self.scripts is None:
            return False
        script_keys, args = request
        return self.taken(queue, self.scripts.run_take(script_keys, args))

    def take_request(self, queue: str, later: float = 0.0
                     ) -> tuple[list[str], list[Any]] | None:
        """TAKE's keys and arguments for `queue`, or None when the pool has no room.

        `later`: how long the take may wait in Redis before it runs (sent behind a wait).
        """
        if self.scripts is None or not self.has_capacity():
            return None
        # A fair share for each free slot: a short queue of slow commands (password hashes)
        # is spread over the idle processes instead of queued behind one.
        free = max(1, self.limit() - len(self.in_flight))
        return self.scripts.take_arguments(self.queue_keys(queue), self.batch_size, free,
                                           self.max_bytes, later)

    def expects_more(self, queue: str) -> bool:
        """Whether the last look at `queue` found messages (so take at once, not wait first)."""
        return queue in self._nonempty

    @property
    def take_sha(self) -> str | None:
        return self.scripts.take_sha if self.scripts is not None else None

    def taken(self, queue: str, reply: Any) -> bool:
        """Hand on what a TAKE of `queue` returned (its raw reply); whether it was anything."""
        assert self.scripts is not None
        taken = self.scripts.taken(self.queue_keys(queue), reply)
        # Per queue: an empty look at another queue does not make this one less busy.
        if len(taken) >= self.batch_size:
            self._busy.add(queue)
        else:
            self._busy.discard(queue)
        if taken:
            self._nonempty.add(queue)
            self.receive(self.queue_keys(queue), taken)
        else:
            self._nonempty.discard(queue)
        return bool(taken)

    def receive(self, keys: QueueKeys, taken: list[Taken]) -> None:
        """Decide per message: report revoked, park delayed, hand the rest to the pool."""
        now = time.time()
        revoked = worker_state.revoked
        together: list[tuple[batch.Received, protocol.Head]] = []
        alone: list[tuple[batch.Received, protocol.Head]] = []
        parked: list[tuple[Parked, protocol.Head, Taken]] = []
        buckets = self.c.task_buckets
        for message in taken:
            try:
                head, verdict, due = self._decide(message, now, revoked, buckets,
                                                  len(parked))
            except Exception:
                # Never the node's end: the pool process decodes it again and settles it.
                logger.exception("message %s could not be looked at; it goes to the pool",
                                 message.tag)
                head, verdict, due = protocol.Head(), batch.APPLY, None
            if due is not None:
                parked.append((Parked(message.tag, due,
                                      parked_member(self.c.hostname, message.tag)),
                               head, message))
                continue
            item = batch.Received(message, now, verdict)
            if message.deliveries > 1 or self._time_limits(head) != (None, None):
                alone.append((item, head))
            else:
                together.append((item, head))
        if parked:
            self._park(keys, parked)
        for job in _jobs(together):
            self._dispatch(keys, job)
        for single in alone:
            self._dispatch(keys, [single], self._time_limits(single[1]))

    def _decide(self, message: Taken, now: float, revoked: Any, buckets: Any,
                parked: int) -> tuple[protocol.Head, str, float | None]:
        """(headers, verdict, due time when it is to be parked) of one taken message."""
        head = protocol.head(message.raw) if message.raw is not None else protocol.Head()
        if head.task_id is not None and head.task_id in revoked:
            return head, batch.REVOKED, None
        if worker_state.revoked_stamps and revoked_by_stamp(message_stamps(message.raw)):
            return head, batch.REVOKED, None
        if head.expires is not None and head.expires.timestamp() <= now:
            return head, batch.EXPIRED, None
        if head.eta is not None and head.eta.timestamp() > now:
            return head, batch.APPLY, head.eta.timestamp()
        if head.task is not None and not self.c.disable_rate_limits:
            bucket = buckets.get(head.task)
            if bucket is not None and not bucket.can_consume(1):
                # Over the task's rate limit: due when its turn comes, one after another.
                return head, batch.APPLY, (now + bucket.expected_time(1)
                                           + parked / max(bucket.fill_rate, 1e-9))
        return head, batch.APPLY, None

    def _time_limits(self, head: protocol.Head) -> tuple[float | None, float | None]:
        """(hard, soft) limits of a message: its own, else its task's (`control time_limit`)."""
        hard, soft = head.time_limits
        task = self.tasks.get(head.task) if head.task else None
        if task is not None:
            hard = hard or task.time_limit
            soft = soft or task.soft_time_limit
        if hard and not soft:
            # A soft limit just short of the hard one: the command is rolled back and
            # reported (TimeLimitExceeded) instead of its process being killed.
            soft = max(hard * 0.9, hard - 1.0)
        return hard, soft

    def _park(self, keys: QueueKeys, parked: list[tuple[Parked, protocol.Head, Taken]]) -> None:
        assert self.scripts is not None
        self.scripts.delay(keys, [entry for entry, _, _ in parked])
        dispatcher = self.c.event_dispatcher
        if dispatcher is not None and dispatcher.enabled:
            for _, head, message in parked:
                if head.task_id is None or message.announced:
                    continue
                fields: dict[str, Any] = {"name": head.task, "eta": head.eta.isoformat()
                                          if head.eta else None,
                                          "expires": head.expires.isoformat()
                                          if head.expires else None}
                if message.raw is not None:
                    try:
                        decoded = protocol.decode(message.raw, self.max_bytes)
                        fields.update(args=safe_repr(decoded.args, positional=True),
                                      kwargs=safe_repr(decoded.kwargs))
                    except protocol.UndecodableMessage:
                        pass
                dispatcher.send("task-received", uuid=head.task_id, **fields)
        self._schedule_promote(min(entry.due for entry, _, _ in parked))

    def _dispatch(self, keys: QueueKeys, items: list[tuple[batch.Received, protocol.Head]],
                  limits: tuple[float | None, float | None] = (None, None)) -> None:
        dispatcher = self.c.event_dispatcher
        events = bool(dispatcher is not None and dispatcher.enabled
                      and "task" in (dispatcher.groups or {"task"}))
        hard, soft = limits
        job = batch.Job(keys, self.c.hostname, tuple(item for item, _ in items), events,
                        soft or hard)
        requests = []
        for item, head in items:
            request = CommandRequest(item.message, head, self.c.hostname, self.tasks)
            worker_state.task_reserved(request)
            requests.append(request)
        self._next_job += 1
        number = self._next_job
        dispatched = self.in_flight[number] = Dispatched(job, requests)
        for request in requests:
            request.job = number
        dispatched.result = self.c.pool.apply_async(
            batch.run_job, args=(job,),
            callback=lambda left: self._soon(self._done, number, left),
            error_callback=lambda error: self._soon(self._failed, number, error),
            accept_callback=lambda pid, when: self._soon(self._accepted, number, pid, when),
            # billiard calls it with keywords: soft=, timeout=.
            timeout_callback=lambda soft, timeout: self._soon(
                self._timed_out, number, soft, timeout),
            # The pool's soft limit is a backstop a moment after the one the command meets in
            # the database (batch.py): a signal landing while that one is being handled would
            # interrupt the handling.
            soft_timeout=_backstop(soft, hard), timeout=hard, correlation_id=requests[0].id,
        )

    def _soon(self, callback: Any, *args: Any) -> None:
        """Run a pool callback on the event loop's thread (the threads pool calls from others)."""
        if threading.get_ident() == self._main_thread or self.c.hub is None:
            callback(*args)
        else:
            self.c.hub.call_soon(callback, *args)

    # --- pool callbacks ---------------------------------------------------------------------

    def _accepted(self, number: int, pid: int, when: float) -> None:
        dispatched = self.in_flight.get(number)
        if dispatched is None:
            return
        dispatched.accepted = True
        started = time.time()
        for request in dispatched.requests:
            request.worker_pid = pid
            request.time_start = started
            worker_state.task_accepted(request)

    def _done(self, number: int, left: Any) -> None:
        dispatched = self.in_flight.pop(number, None)
        if dispatched is None:
            return
        if not dispatched.accepted:
            # solo and threads pools may report the result without an accept first.
            for request in dispatched.requests:
                worker_state.task_accepted(request)
        left_tags = set(left) if isinstance(left, tuple | list) else {
            item.message.tag for item in dispatched.job.items}
        for request in dispatched.requests:
            worker_state.task_ready(request, successful=request.message.tag not in left_tags)
        if left_tags:
            self._requeue(dispatched.job, [item.message for item in dispatched.job.items
                                           if item.message.tag in left_tags])

    def _failed(self, number: int, error: Any) -> None:
        """The pool process died (or was killed) with the job: its messages go back, counted."""
        dispatched = self.in_flight.pop(number, None)
        if dispatched is None:
            return
        cause = getattr(error, "exception", error)
        cause = getattr(cause, "exc", cause)  # billiard wraps it (ExceptionWithTraceback)
        logger.error("a pool process was lost while applying %r (%s); its messages go back on "
                     "the queue, each to be applied alone", dispatched.job,
                     type(cause).__name__)
        for request in dispatched.requests:
            worker_state.task_ready(request)
        self._requeue(dispatched.job, [item.message for item in dispatched.job.items])

    def _timed_out(self, number: int, soft: bool, limit: float) -> None:
        dispatched = self.in_flight.get(number)
        if dispatched is None:
            return
        logger.warning("%r exceeded its %s time limit of %.3g s", dispatched.job,
                       "soft" if soft else "hard", limit)
        if not soft:
            # The process is killed: like any lost process, its messages go back (counted),
            # and one that keeps exceeding the limit is dead-lettered after MAX_DELIVERIES.
            self._failed(number, TimeLimitExceeded(limit))

    def _requeue(self, job: batch.Job, messages: list[Taken], counted: bool = True) -> None:
        if self.scripts is None or not messages:
            return
        try:
            self.scripts.requeue(job.keys, messages, counted=counted)
        except Exception:
            logger.warning("could not put %d message(s) back yet; they come back after the "
                           "visibility timeout", len(messages), exc_info=True)

    # --- timers -----------------------------------------------------------------------------

    def restore_visible(self) -> None:
        """Renew the leases of the messages held here; put back those of nodes gone."""
        if self.scripts is None:
            return
        held: dict[QueueKeys, list[Taken]] = {}
        for dispatched in self.in_flight.values():
            held.setdefault(dispatched.job.keys, []).extend(
                item.message for item in dispatched.job.items)
        for keys, messages in held.items():
            try:
                self.scripts.touch(keys, messages)
            except Exception:
                logger.warning("could not renew the lease of %d message(s)", len(messages),
                               exc_info=True)
        for queue in self.consumed_queues():
            try:
                keys = self.queue_keys(queue)
                restored = self.scripts.restore(keys, self.visibility_timeout)
                restored += self.scripts.restore_legacy(keys, self.visibility_timeout)
            except Exception:
                logger.warning("could not look for unacknowledged messages of %r", queue,
                               exc_info=True)
                continue
            if restored:
                logger.warning("%d message(s) of %r unacknowledged for more than %d s were put "
                               "back on the queue", restored, queue, self.visibility_timeout)

    def promote(self) -> None:
        """Move due parked messages back to their queues; wake up again at the next due one."""
        if self.scripts is None:
            return
        soonest: float | None = None
        for queue in self.consumed_queues():
            try:
                _, following = self.scripts.promote(self.queue_keys(queue))
            except Exception:
                logger.warning("could not look at the delayed messages of %r", queue,
                               exc_info=True)
                continue
            if following is not None and (soonest is None or following < soonest):
                soonest = following
        if soonest is not None:
            self._schedule_promote(soonest)

    def _schedule_promote(self, due: float) -> None:
        hub = self.c.hub
        if hub is None:
            return
        delay = max(0.0, due - time.time())
        if delay >= PROMOTE_INTERVAL:
            return  # the periodic look will get there
        if self._promote_timer is not None:
            self._promote_timer.cancel()
        self._promote_timer = hub.call_later(delay + 0.001, self.promote)

    # --- stopping ---------------------------------------------------------------------------

    def requeue_discarded(self) -> None:
        """Jobs the pool dropped unrun (it does on every lost connection and at shutdown):
        their messages go back now, not counted as a delivery."""
        for number, dispatched in list(self.in_flight.items()):
            if dispatched.discarded():
                del self.in_flight[number]
                for request in dispatched.requests:
                    worker_state.task_ready(request)
                self._requeue(dispatched.job, [item.message for item in dispatched.job.items],
                              counted=False)

    def requeue_unfinished(self) -> None:
        """After the pool stopped: jobs it never finished go back on the queue now."""
        for number in list(self.in_flight):
            dispatched = self.in_flight.pop(number)
            for request in dispatched.requests:
                worker_state.task_ready(request)
            # A job no process accepted ended cleanly; one that was running may have killed it.
            self._requeue(dispatched.job, [item.message for item in dispatched.job.items],
                          counted=dispatched.accepted)

    def scheduled(self) -> list[dict[str, Any]]:
        """`inspect scheduled`: the messages this node parked, soonest first."""
        if self.scripts is None:
            return []
        found = []
        for queue in self.consumed_queues():
            for due, raw in self.scripts.parked(self.queue_keys(queue), self.c.hostname):
                message = Taken(queue, "", 1, raw, len(raw))
                request = CommandRequest(message, protocol.head(raw), self.c.hostname,
                                         self.tasks)
                found.append({"eta": datetime.fromtimestamp(due, UTC).isoformat(),
                              "priority": 6, "request": request.info()})
        return found


class BatchIntake(bootsteps.StartStopStep):
    """The bootstep that makes Celery's task consumer take its queues in batches (`Intake`).

    It runs after Celery's own `Tasks` step, which sets up the task consumer, its queues and
    its prefetch (QoS), and hands the consumer's channel to the intake before the event loop
    starts consuming.
    """

    # After Gossip too: its consumers exist only once its own start has run, and the guard
    # below wraps them (the order of steps with no dependency between them is not fixed).
    requires = ("celery.worker.consumer.tasks:Tasks", "celery.worker.consumer.gossip:Gossip")

    def __init__(self, c: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        c.command_intake = Intake(c, batch_size)

    def start(self, c: Any) -> None:
        c.command_intake.attach(c.task_consumer.channel)
        _guard_gossip(c)

    def register_with_event_loop(self, c: Any, hub: Any) -> None:
        intake: Intake = c.command_intake
        interval = max(1.0, min(10.0, intake.visibility_timeout / 4))
        hub.call_repeatedly(interval, intake.restore_visible)
        hub.call_repeatedly(PROMOTE_INTERVAL, intake.promote)

    def stop(self, c: Any) -> None:
        # After the consumer closed (the pool has flushed the jobs no process had started).
        c.command_intake.detach()
        c.command_intake.requeue_discarded()

    def shutdown(self, c: Any) -> None:
        # The worker's pool has stopped by now: what it never finished goes back at once.
        c.command_intake.detach()
        c.command_intake.requeue_unfinished()

    def info(self, c: Any) -> dict[str, Any]:
        return {"batch_size": c.command_intake.batch_size,
                "jobs_in_flight": len(c.command_intake.in_flight)}


def _guard_gossip(c: Any) -> None:
    """Keep a worker event that gossip cannot handle from stopping the node.

    Celery's gossip step handles every `worker.*` event any client publishes, and one it
    cannot (an election request with a field missing or of the wrong type, an event without
    a hostname) raises out of the event loop: "Unrecoverable error", on every node at once.
    """
    gossip = getattr(c, "gossip", None)
    for consumer in getattr(gossip, "consumers", None) or ():
        handler = consumer.on_message
        if handler is None or getattr(handler, "guarded", False):
            continue

        def guarded(message: Any, handler: Any = handler) -> Any:
            try:
                return handler(message)
            except Exception:
                logger.warning("a worker event could not be handled and was dropped: %s",
                               printable(getattr(message, "delivery_info", {}).get(
                                   "routing_key")), exc_info=True)
                return None

        guarded.guarded = True  # type: ignore[attr-defined]
        consumer.on_message = guarded


def _install_control_commands() -> None:
    """Replies that Celery's own handlers would get wrong for this node."""
    from celery.worker.control import control_command, inspect_command, nok, ok

    @inspect_command(alias="dump_schedule")
    def scheduled(state: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """List of messages this node parked until their eta, countdown or rate limit."""
        intake: Intake | None = getattr(state.consumer, "command_intake", None)
        return intake.scheduled() if intake is not None else []

    @control_command()
    def disable_events(state: Any) -> dict[str, str]:
        """Tell worker(s) to stop sending task-related events."""
        dispatcher = state.consumer.event_dispatcher
        if dispatcher is None:
            return dict(nok("event dispatcher unavailable"))
        # No groups means every group (`-E`), where Celery's own handler finds no "task" to
        # take away, answers "already disabled" and goes on sending them.
        if not dispatcher.groups:
            dispatcher.groups.update({"task", "worker"})
        if "task" in dispatcher.groups:
            dispatcher.groups.discard("task")
            logger.info("Events of group {task} disabled by remote.")
            return dict(ok("task events disabled"))
        return dict(ok("task events already disabled"))

    del scheduled, disable_events


_install_control_commands()
