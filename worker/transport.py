"""kombu's Redis transport, with a command queue taken in batches instead of message by message.

Everything a Celery worker does over Redis (remote control, events, heartbeats, gossip,
mingle, publishing) stays kombu's. What changes is the channel that consumes the command
queues: when the worker node attaches its intake (worker/node.py), the channel waits for the
queue with `BLMOVE q q RIGHT RIGHT` (which removes nothing) with the intake's take queued
behind it, so that the wake-up brings a whole batch, taken atomically (worker/broker.py),
rather than messages delivered one at a time through kombu, which is what bounds a stock
worker's main process. A queue that had messages at the last look is taken without a wait.

The transport is registered under kombu's own `redis`, `rediss` and `sentinel` names
(`register()`), so broker URLs stay plain: Flower and other tools that look at the URL's
scheme see the Redis broker they know.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from time import monotonic
from typing import Any, Protocol

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from redis.exceptions import NoScriptError

logger = logging.getLogger(__name__)

#: Longest wait for a message before the intake looks again at every list of its queues
#: (priority sub-lists and further queues are not watched by BLMOVE, which waits on one).
WAIT_SECONDS = 0.5
#: After a Redis error on the command queue (a key of the wrong type, say), wait this long.
ERROR_BACKOFF_SECONDS = 2.0


class Intake(Protocol):
    """What the channel needs of the worker node's intake (worker/node.py)."""

    def has_capacity(self) -> bool:
        """Whether the pool can take another batch now."""

    def take(self, queue: str) -> bool:
        """Take a batch from `queue` and hand it on; whether anything was taken."""

    def expects_more(self, queue: str) -> bool:
        """Whether the last look at `queue` found messages."""

    def take_request(self, queue: str, later: float = 0.0
                     ) -> tuple[list[str], list[Any]] | None:
        """TAKE's keys and arguments for `queue` now (None: no room)."""

    @property
    def take_sha(self) -> str | None:
        """TAKE's SHA-1 (None before the intake has its scripts)."""

    def taken(self, queue: str, reply: Any) -> bool:
        """Hand on TAKE's raw reply for `queue`; whether it held anything."""


class QoS(kombu_redis.QoS):
    """Consumption credit is the intake's (batches in flight), not kombu's per-message count.

    Restoring unacknowledged messages is the intake's too, per queue and in one Lua call
    (worker/broker.py): this worker never puts anything in kombu's own `unacked` hash (its
    control, event and gossip consumers run without acknowledgment), and kombu's sweep of
    that hash would stop the worker on an entry that is not JSON.
    """

    def can_consume(self) -> bool:
        intake = self.channel.intake
        if intake is not None:
            return bool(intake.has_capacity())
        return bool(super().can_consume())

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        return None


class CollectedPublishes:
    """A kombu publish batch that sends nothing: it keeps each message's Redis PUBLISH.

    kombu's Redis channel routes a message with a publish batch by handing the batch each
    final Redis command (`add`) instead of sending it. Kept here as (channel, payload) pairs,
    they go out with whatever their owner sends next (a batch's FINISH), costing no round
    trip of their own.
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.publishes: list[tuple[str, bytes | str]] = []

    def publish(self, message: Any, **kwargs: Any) -> Any:
        """Route `message` as kombu would; its Redis commands are kept."""
        return self.channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args: Any) -> None:
        """One Redis command of the message being routed (fanout messages: PUBLISH only)."""
        if name != "publish":
            raise ValueError(f"only fanout messages can be collected, not {name!r}")
        topic, payload = args
        self.publishes.append((topic, payload))

    def flush(self) -> None:
        """Nothing to send: the owner sends what was kept."""

    def discard(self) -> None:
        """Forget what was kept."""
        self.publishes.clear()

    def close(self) -> None:
        """Nothing held here."""


class BatchChannel(kombu_redis.Channel):
    """A Redis channel whose command queues, once an intake is attached, are taken in batches."""

    QoS = QoS
    #: Set by the worker node on the channel of its task consumer.
    intake: Intake | None = None
    #: While set (`collecting_publishes`), publishes in `Producer.batch()` are kept here.
    collector: CollectedPublishes | None = None
    _polled_queue: str | None = None
    #: The commands sent for the poll in progress, in order (their replies are read so).
    _polled: tuple[str, ...] = ()
    _quiet_until = 0.0
    _last_error_logged = 0.0

    def basic_publish(self, message: Any, exchange: str, routing_key: str,
                      **kwargs: Any) -> Any:
        if self.collector is not None and kwargs.get("_publish_batch") is None:
            kwargs["_publish_batch"] = self.collector
        return super().basic_publish(message, exchange, routing_key, **kwargs)

    def _brpop_start(self, timeout: float | None = None) -> None:
        if self.intake is None:
            super()._brpop_start(timeout)
            return
        if monotonic() < self._quiet_until:
            return
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        queue = str(queues[0])
        connection = self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        self._polled_queue = queue
        wait = WAIT_SECONDS if timeout is None else min(timeout, WAIT_SECONDS)
        blmove: tuple[Any, ...] = ("BLMOVE", queue, queue, "RIGHT", "RIGHT", wait)
        # Nothing was waiting at the last look: wait for the queue first. The take queued
        # behind the wait runs as soon as it ends (a message came, or the time is up), so a
        # wake-up brings its batch instead of costing another round trip; a closed connection
        # drops it unrun. Messages were waiting: take at once, without a wait.
        commands = [] if self.intake.expects_more(queue) else [blmove]
        request = self.intake.take_request(queue, later=wait if commands else 0.0)
        sha = self.intake.take_sha
        if request is not None and sha is not None:
            script_keys, args = request
            commands.append(("EVALSHA", sha, len(script_keys), *script_keys, *args))
        commands = commands or [blmove]
        self._polled = tuple(command[0] for command in commands)
        connection.send_packed_command(connection.pack_commands(commands))

    def _brpop_read(self, **options: Any) -> bool:
        queue, self._polled_queue = self._polled_queue, None
        if queue is None or self.intake is None:
            return bool(super()._brpop_read(**options))
        sent, self._polled = self._polled, ()
        replies: list[Any] = []
        failure: Exception | None = None
        try:
            try:
                # Every reply is read, an error or not, so that none is left for the next
                # command on this connection.
                for command in sent:
                    try:
                        replies.append(self.client.parse_response(
                            self.client.connection, command, **options))
                    except self.ResponseError as error:
                        replies.append(None)
                        failure = failure or error
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()
        took = sent[-1] == "EVALSHA"
        if failure is not None:
            if took and isinstance(failure, NoScriptError):
                took = False  # a restarted Redis: the synchronous take loads the script
            else:
                self._back_off(queue, failure)
                raise Empty() from None
        self._queue_cycle.rotate(queue)
        try:
            # After a wait without a take behind it, whether the wait ended with a message or
            # timed out, the intake looks at every list of the queue: a timeout is when
            # priority sub-lists get a look (the take behind a wait looks at them all too).
            taken = (self.intake.taken(queue, replies[-1]) if took
                     else self.intake.take(queue))
        except self.ResponseError as error:
            self._back_off(queue, error)
            raise Empty() from None
        if not taken:
            raise Empty()
        return True

    def _back_off(self, queue: str, error: Exception) -> None:
        """A Redis error on the command queue: say so (at most every minute), wait, try again."""
        now = monotonic()
        self._quiet_until = now + ERROR_BACKOFF_SECONDS
        if now - self._last_error_logged >= 60:
            self._last_error_logged = now
            logger.error("cannot take commands from queue %r: Redis answered %s (is the key "
                         "a list?); trying again every %.0f s", queue, error,
                         ERROR_BACKOFF_SECONDS)

    def scripts_client(self) -> Any:
        """A Redis client on this channel's connection pool (a Sentinel-managed one too)."""
        return self._create_client()


class Transport(kombu_redis.Transport):
    """The Redis transport with batch-taking command queues."""

    Channel = BatchChannel

    def driver_version(self) -> str:
        import redis

        return str(redis.__version__)


class SentinelChannel(BatchChannel, kombu_redis.SentinelChannel):
    """A Redis Sentinel channel with batch-taking command queues."""


class SentinelTransport(kombu_redis.SentinelTransport):
    """The Redis Sentinel transport (`sentinel://` URLs) with batch-taking command queues."""

    Channel = SentinelChannel


def register() -> None:
    """Make kombu's `redis`, `rediss` and `sentinel` URLs use this module's transports."""
    TRANSPORT_ALIASES["redis"] = "worker.transport:Transport"
    TRANSPORT_ALIASES["rediss"] = "worker.transport:Transport"
    TRANSPORT_ALIASES["sentinel"] = "worker.transport:SentinelTransport"


@contextmanager
def collecting_publishes(producer: Any) -> Iterator[list[tuple[str, bytes | str]]]:
    """Messages `producer` publishes meanwhile are not sent: their (channel, payload) are kept.

    The producer's channel must be one of this module's (`BatchChannel`).
    """
    channel = producer.channel
    collector = CollectedPublishes(channel)
    channel.collector = collector
    try:
        yield collector.publishes
    finally:
        channel.collector = None
