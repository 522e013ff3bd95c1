"""A kombu Redis transport that never holds a message outside Redis, and bounds redeliveries.

Stock kombu takes a message with BRPOP and records it as unacknowledged in a second step,
so a worker killed between the two loses it (FINDINGS.md). Here the consumer blocks with
`BLMOVE q q RIGHT RIGHT` (which waits for a message without removing it), then one Lua
script pops the message and records it in kombu's unacked hash and index, atomically. The
same script counts deliveries per message and sets aside items that are not JSON envelopes
or exceed the size limit in a quarantine list, from which they become dead letters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from queue import Empty
from time import monotonic, time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.json import loads

logger = logging.getLogger(__name__)

DELIVERY_COUNT_HEADER = "x_delivery_count"

# KEYS: queue, unacked hash, unacked index, deliveries hash, quarantine list
# ARGV: now, max bytes, most to take, consumers sharing the queue
# Takes a fair share of the queue (its length / consumers, at most ARGV[3], at least 1), so
# that a short queue of slow commands (password hashes) is spread over every consumer.
# Returns a flat list: per item taken, either "quarantined" or the item and its deliveries.
TAKE_SCRIPT = """
local taken = {}
local share = math.ceil(redis.call('LLEN', KEYS[1]) / tonumber(ARGV[4]))
for _ = 1, math.max(1, math.min(tonumber(ARGV[3]), share)) do
  local item = redis.call('RPOP', KEYS[1])
  if not item then break end
  local ok, message = false, nil
  if string.len(item) <= tonumber(ARGV[2]) then
    ok, message = pcall(cjson.decode, item)
  end
  if not ok or type(message) ~= 'table' or type(message['properties']) ~= 'table'
     or type(message['properties']['delivery_tag']) ~= 'string'
     or type(message['properties']['delivery_info']) ~= 'table' then
    redis.call('LPUSH', KEYS[5], item)
    table.insert(taken, 'quarantined')
  else
    local tag = message['properties']['delivery_tag']
    local info = message['properties']['delivery_info']
    local exchange = info['exchange']
    local routing_key = info['routing_key']
    if type(exchange) ~= 'string' then exchange = '' end
    if type(routing_key) ~= 'string' then routing_key = KEYS[1] end
    redis.call('ZADD', KEYS[3], ARGV[1], tag)
    redis.call('HSET', KEYS[2], tag,
      '[' .. item .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']')
    table.insert(taken, item)
    table.insert(taken, redis.call('HINCRBY', KEYS[4], tag, 1))
  end
end
return taken
"""


def take_keys(queue: str, unacked_key: str = "unacked",
              unacked_index_key: str = "unacked_index") -> list[str]:
    """The keys TAKE_SCRIPT works on for `queue`."""
    return [queue, unacked_key, unacked_index_key, deliveries_key(queue), quarantine_key(queue)]


def parse_taken(taken: list[Any]) -> tuple[list[tuple[bytes, int]], int]:
    """TAKE_SCRIPT's reply as ([(item, deliveries)], how many were quarantined)."""
    items: list[tuple[bytes, int]] = []
    quarantined = 0
    index = 0
    while index < len(taken):
        if taken[index] == b"quarantined":
            quarantined += 1
            index += 1
        else:
            items.append((taken[index], int(taken[index + 1])))
            index += 2
    return items, quarantined


QuarantineHandler = Callable[[str, bytes], None]
_quarantine_handler: QuarantineHandler | None = None


def set_quarantine_handler(handler: QuarantineHandler | None) -> None:
    """Who turns quarantined queue items into dead letters: `handler(queue, raw_item)`."""
    global _quarantine_handler
    _quarantine_handler = handler


def deliveries_key(queue: str) -> str:
    """The hash counting deliveries per delivery tag of `queue`."""
    return f"{queue}.deliveries"


def unacked_mutex_expire(visibility_timeout: int) -> int:
    """How long kombu's restore sweep may hold its mutex (kombu's default: 300 s).

    A consumer killed mid-sweep leaves the mutex held until it expires, and no one restores
    the messages of dead consumers meanwhile: with a short visibility timeout (and a sweep a
    second) that is most of a kill's cost. A sweep takes well under a second.
    """
    return max(10, min(300, visibility_timeout))


# How long a drainer holds a quarantine's lock at most (it records a few rows meanwhile).
QUARANTINE_LOCK_SECONDS = 60


def quarantine_key(queue: str) -> str:
    """The list holding `queue` items that are not messages, until they are dead letters."""
    return f"{queue}.quarantine"


def drain_quarantine(client: Any, queue: str) -> int:
    """Hand each quarantined item of `queue` to the handler, removing it only afterwards.

    One consumer drains a queue's quarantine at a time (a lock, which expires should its
    holder die): two draining at once could both record the item the other is recording.
    One that finds the lock taken leaves the items to the holder, or to a later sweep.
    """
    if _quarantine_handler is None:
        return 0
    drained = 0
    key = quarantine_key(queue)
    if not client.llen(key):
        return 0  # the usual case for a sweep: no lock taken for nothing
    lock = client.lock(f"{key}.lock", timeout=QUARANTINE_LOCK_SECONDS, blocking=False)
    if not lock.acquire():
        return 0
    try:
        while True:
            raw = client.lindex(key, -1)
            if raw is None:
                return drained
            _quarantine_handler(queue, raw)
            client.lrem(key, -1, raw)
            drained += 1
    finally:
        with suppress(redis.exceptions.LockError):
            lock.release()


def drain_quarantine_quietly(client: Any, queue: str) -> None:
    """`drain_quarantine`, logging a failure: the items stay quarantined, for a later sweep."""
    try:
        drain_quarantine(client, queue)
    except Exception:
        logger.warning("could not record a quarantined message yet", exc_info=True)


class QoS(kombu_redis.QoS):
    """kombu's QoS that also forgets a message's delivery count once it is settled.

    One pipeline per settled message (kombu's unacked index and hash, and the count).
    """

    def ack(self, delivery_tag: str) -> None:
        self._settle(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:  # back on the queue: its delivery count goes on
            super().reject(delivery_tag, requeue=True)
        else:
            self._settle(delivery_tag)

    def _settle(self, delivery_tag: str) -> None:
        message = self._delivered.get(delivery_tag)
        queue = message.delivery_info.get("routing_key") if message is not None else None
        pipe = self._remove_from_indices(delivery_tag)
        for name in {queue, *self.channel.active_queues} - {None}:
            pipe.hdel(deliveries_key(str(name)), delivery_tag)
        pipe.execute()
        # What kombu's Redis QoS does after its own pipeline: forget the message here.
        super(kombu_redis.QoS, self).ack(delivery_tag)


class CollectedPublishes:
    """A kombu publish batch that sends nothing: it keeps each message's Redis PUBLISH.

    kombu (5.7) routes a message published inside `Producer.batch()` through the channel's
    `create_publish_batch`, and the transport hands the batch each final Redis command
    (`add`). Kept here as (channel, payload) pairs, they go out with whatever its owner sends
    next (the batch consumer's FINISH_SCRIPT), costing no round trip of their own.
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


class AtomicFetch(kombu_redis.Channel):
    """What makes a Redis channel's fetch atomic (see the module docstring)."""

    QoS = QoS
    # One list per queue: BLMOVE watches exactly one (priority sub-lists are not consumed).
    priority_steps = [0]  # noqa: RUF012 - kombu's own attribute
    max_message_bytes = 1_048_576
    _quarantine_checked_at = 0.0
    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options, "max_message_bytes",
    )
    _polled_queue: str | None = None
    #: While set (`collecting_publishes`), publishes in `Producer.batch()` are kept here.
    collector: CollectedPublishes | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._unacknowledged_queues: set[str] = set()
        super().__init__(*args, **kwargs)
        self._take = self.client.register_script(TAKE_SCRIPT)

    def create_publish_batch(self, max_size: int) -> Any:
        if self.collector is not None:
            return self.collector
        return super().create_publish_batch(max_size)

    def _reliable_queue(self) -> str | None:
        # BLMOVE watches one list: one queue, no priority sub-queues. Queues consumed without
        # acknowledgement (control replies) keep kombu's own fetch: nothing to recover there.
        if len(self.active_queues) != 1 or list(self.priority_steps) != [0]:
            return None
        queue = str(next(iter(self.active_queues)))
        return None if queue in self._unacknowledged_queues else queue

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._unacknowledged_queues.add(queue)
        else:
            self._unacknowledged_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _brpop_start(self, timeout: float | None = None) -> None:
        queue = self._reliable_queue()
        if queue is None:
            super()._brpop_start(timeout)
            return
        if timeout is None:
            timeout = self.brpop_timeout
        self._retry_quarantine(queue)
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        self._polled_queue = queue
        self.client.connection.send_command("BLMOVE", queue, queue, "RIGHT", "RIGHT",
                                            timeout or 0)

    def _brpop_read(self, **options: Any) -> bool:
        queue = getattr(self, "_polled_queue", None)
        if queue is None:
            return bool(super()._brpop_read(**options))
        self._polled_queue = None
        try:
            try:
                waited = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if waited is None:
                raise Empty()
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()
        if not self._take_one(queue):
            raise Empty()
        return True

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        # The synchronous path (drain_events without an event loop) uses the same take.
        with self.conn_or_acquire() as client:
            taken = self._run_take(client, queue)
        if taken is None:
            raise Empty()
        return taken

    def _retry_quarantine(self, queue: str) -> None:
        now = monotonic()
        if now - self._quarantine_checked_at < 30:
            return
        self._quarantine_checked_at = now
        with self.conn_or_acquire() as client:
            drain_quarantine_quietly(client, queue)

    def _take_one(self, queue: str) -> bool:
        with self.conn_or_acquire() as client:
            payload = self._run_take(client, queue)
        if payload is None:
            return False
        self.connection._deliver(payload, queue)
        return True

    def _run_take(self, client: Any, queue: str) -> Any:
        keys = take_keys(queue, self.unacked_key, self.unacked_index_key)
        while True:
            taken = self._take(keys=keys, args=[time(), self.max_message_bytes, 1, 1],
                               client=client)
            items, quarantined = parse_taken(taken)
            if quarantined:
                drain_quarantine_quietly(client, queue)
            if items:
                (raw, deliveries), = items
                payload = loads(raw)
                payload.setdefault("headers", {})[DELIVERY_COUNT_HEADER] = deliveries
                return payload
            if not quarantined:
                return None


class Channel(AtomicFetch):
    """A Redis channel with the atomic fetch."""


class SentinelChannel(AtomicFetch, kombu_redis.SentinelChannel):
    """A Redis Sentinel channel with the atomic fetch."""

    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.SentinelChannel.from_transport_options, "max_message_bytes",
    )


class Transport(kombu_redis.Transport):
    """The Redis transport with the atomic fetch; select it with `broker_transport`."""

    Channel = Channel

    def driver_version(self) -> str:
        import redis

        return str(redis.__version__)


class SentinelTransport(kombu_redis.SentinelTransport):
    """The Redis Sentinel transport (`sentinel://` URLs) with the atomic fetch."""

    Channel = SentinelChannel


@contextmanager
def collecting_publishes(producer: Any) -> Iterator[list[tuple[str, bytes | str]]]:
    """Messages `producer` publishes meanwhile are not sent: their (channel, payload) are kept.

    The producer's channel must be one of this module's (`AtomicFetch`).
    """
    channel = producer.channel
    collector = CollectedPublishes(channel)
    channel.collector = collector
    try:
        with producer.batch():
            yield collector.publishes
    finally:
        channel.collector = None


# Finishes a batch in one atomic step. KEYS: the n result keys, then the unacked hash, the
# unacked index and the deliveries hash. ARGV: result expiry (s), n, the n results, m, the m
# delivery tags to acknowledge, then (channel, message) pairs to publish (task events).
# Each result is stored only if none is (the first outcome stands, as with Celery's backend)
# and published on its key's channel, as Celery's Redis backend does for waiting clients.
FINISH_SCRIPT = """
local n = tonumber(ARGV[2])
for i = 1, n do
  redis.call('SET', KEYS[i], ARGV[2 + i], 'EX', ARGV[1], 'NX')
  redis.call('PUBLISH', KEYS[i], ARGV[2 + i])
end
local m = tonumber(ARGV[3 + n])
if m > 0 then
  local tags = {unpack(ARGV, 4 + n, 3 + n + m)}
  redis.call('ZREM', KEYS[n + 2], unpack(tags))
  redis.call('HDEL', KEYS[n + 1], unpack(tags))
  redis.call('HDEL', KEYS[n + 3], unpack(tags))
end
for i = 4 + n + m, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return n
"""


def finish_arguments(queue: str, results: Sequence[tuple[str, str | bytes]], expires: int,
                     ack_tags: Sequence[str], publishes: Sequence[tuple[str, bytes | str]],
                     unacked_key: str = "unacked", unacked_index_key: str = "unacked_index"
                     ) -> tuple[list[str], list[Any]]:
    """FINISH_SCRIPT's keys and arguments."""
    keys = [key for key, _ in results] + [unacked_key, unacked_index_key, deliveries_key(queue)]
    args: list[Any] = [expires, len(results), *(value for _, value in results),
                       len(ack_tags), *ack_tags]
    for channel, payload in publishes:
        args += [channel, payload]
    return keys, args


def transport_for(url: str) -> str:
    """The `broker_transport` path for a broker URL."""
    return ("worker.transport:SentinelTransport" if url.startswith("sentinel")
            else "worker.transport:Transport")
