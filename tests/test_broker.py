"""The queue scripts against a real Redis: what each moves, atomically, and what it leaves."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from worker.broker import QueueKeys, Scripts, finish_arguments, stored
from worker.protocol import encode


@pytest.fixture
def client(broker_url: str) -> redis.Redis:
    return redis.Redis.from_url(broker_url)


@pytest.fixture
def keys(client: redis.Redis) -> Iterator[QueueKeys]:
    queue = QueueKeys(f"scripts-{uuid.uuid4().hex[:8]}")
    yield queue
    client.delete(*queue.lists, queue.unacked, queue.unacked_index, queue.tags,
                  queue.delayed, queue.delayed_items)


@pytest.fixture
def scripts(client: redis.Redis) -> Scripts:
    return Scripts(client)


def test_take_moves_any_bytes_into_the_unacknowledged_set_with_a_tag_of_its_own(
    client: redis.Redis, keys: QueueKeys, scripts: Scripts
) -> None:
    items = [b"not json at all", b'{"body": 0x10}', b"\x80\x04pickle", encode("tags.create", {})]
    client.lpush(keys.queue, *items)
    taken = scripts.take(keys, most=10, sharing=1, max_bytes=1 << 20)
    assert [message.raw for message in taken] == items  # oldest first
    assert len({message.tag for message in taken}) == 4
    assert client.llen(keys.queue) == 0
    assert {client.hget(keys.unacked, message.tag) for message in taken} == {
        stored(item, 1) for item in items}  # kept with the count of this delivery
    assert client.zcard(keys.unacked_index) == 4
    assert all(message.deliveries == 1 for message in taken)


def test_take_takes_a_fair_share_and_priority_lists_after_the_base_list(
    client: redis.Redis, keys: QueueKeys, scripts: Scripts
) -> None:
    client.lpush(keys.lists[3], b"priority 9")
    client.lpush(keys.lists[1], b"priority 3")
    client.lpush(keys.queue, *[f"plain {i}".encode() for i in range(4)])
    first = scripts.take(keys, most=100, sharing=2, max_bytes=1 << 20)
    assert [message.raw for message in first] == [b"plain 0", b"plain 1", b"plain 2"]  # 6 / 2
    rest = scripts.take(keys, most=100, sharing=1, max_bytes=1 << 20)
    assert [message.raw for message in rest] == [b"plain 3", b"priority 3", b"priority 9"]


def test_an_item_over_the_limit_comes_back_as_its_size_and_tail(
    client: redis.Redis, keys: QueueKeys, scripts: Scripts
) -> None:
    raw = b"x" * 50_000 + b'"headers": {"id": "big-1"}}'
    client.lpush(keys.queue, raw)
    (message,) = scripts.take(keys, most=10, sharing=1, max_bytes=10_000)
    assert message.raw is None and message.size == len(raw)
    assert message.tail.endswith(b'"big-1"}}') and len(message.tail) == 16_384
    assert client.hget(keys.unacked, message.tag) == stored(raw, 1)  # still in Redis


def test_finish_stores_results_acknowledges_and_never_overwrites_a_success(
    client: redis.Redis, keys: QueueKeys, scripts: Scripts
) -> None:
    client.lpush(keys.queue, b"one", b"two")
    taken = scripts.take(keys, most=10, sharing=1, max_bytes=1 << 20)
    done = f"result-{uuid.uuid4().hex}"
    revoked = f"result-{uuid.uuid4().hex}"
    client.set(done, json.dumps({"status": "SUCCESS", "result": 1}))
    client.set(revoked, json.dumps({"status": "REVOKED"}))
    script_keys, args = finish_arguments(
        keys, [(done, b'{"status": "FAILURE"}'), (revoked, b'{"status": "SUCCESS"}')], 60,
        taken, [])
    scripts.finish_script(keys=script_keys, args=args)
    assert json.loads(client.get(done) or b"")["status"] == "SUCCESS"  # the first stands
    assert json.loads(client.get(revoked) or b"")["status"] == "SUCCESS"
    assert client.ttl(revoked) > 0
    assert client.hlen(keys.unacked) == 0 and client.zcard(keys.unacked_index) == 0
    client.delete(done, revoked)


def test_requeue_puts_messages_back_next_in_line_counted_or_not(
    client: redis.Redis, keys: QueueKeys, scripts: Scripts
) -> None:
    client.lpush(keys.queue, b"a", b"b")
    taken = scripts.take(keys, most=10, sharing=1, max_bytes=1 << 20)
    client.lpush(keys.queue, b"newer")
    assert scripts.requeue(keys, taken[:1], counted=True) == 1
    assert scripts.requeue(keys, taken[1:], counted=False) == 1
    assert scripts.requeue(keys, taken, counted=True) == 0  # already back: nothing twice
    again = scripts.take(keys, most=2, sharing=1, max_bytes=1 << 20)  # before "newer"
    assert {message.raw: message.deliveries for message in again} == {b"a": 2, b"b": 1}


def test_every_copy_counts_its_own_deliveries_and_a_forged_count_is_just_bytes(
    client: redis.Redis, keys: QueueKeys, scripts: Scripts
) -> None:
    client.lpush(keys.queue, b"same", b"same", b"same", stored(b"old", 4),
                 b"\x00cw:not a count:x")
    taken = scripts.take(keys, most=10, sharing=1, max_bytes=1 << 20)
    assert [(message.raw, message.deliveries) for message in taken] == [
        (b"same", 1), (b"same", 1), (b"same", 1), (b"old", 5), (b"\x00cw:not a count:x", 1)]


def test_restore_puts_back_only_what_no_live_node_renewed(
    client: redis.Redis, keys: QueueKeys, scripts: Scripts
) -> None:
    client.lpush(keys.queue, b"held", b"abandoned")
    held, abandoned = scripts.take(keys, most=10, sharing=1, max_bytes=1 << 20)
    # Both taken "10 s ago"; the live node renews the lease of the one it still holds.
    client.zadd(keys.unacked_index, {held.tag: time.time() - 10, abandoned.tag: time.time() - 10})
    scripts.touch(keys, [held])
    assert scripts.restore(keys, visibility_timeout=5) == 1
    assert client.lrange(keys.queue, 0, -1) == [stored(b"abandoned", 1)]  # counted
    assert client.hexists(keys.unacked, held.tag)


def test_a_parked_message_leaves_the_unacknowledged_set_until_it_is_due(
    client: redis.Redis, keys: QueueKeys, scripts: Scripts
) -> None:
    from worker.broker import Parked

    client.lpush(keys.queue, b"later", b"soon")
    later, soon = scripts.take(keys, most=10, sharing=1, max_bytes=1 << 20)
    scripts.delay(keys, [Parked(later.tag, time.time() + 60, f"n|{later.tag}"),
                         Parked(soon.tag, time.time() - 1, f"n|{soon.tag}")])
    assert client.hlen(keys.unacked) == 0
    moved, following = scripts.promote(keys)
    assert moved == 1 and following is not None and following > time.time() + 50
    # Back with its count (not this delivery: it ended cleanly) and its announcement.
    assert client.lrange(keys.queue, 0, -1) == [stored(b"soon", 0, announced=True)]
    (again,) = scripts.take(keys, most=10, sharing=1, max_bytes=1 << 20)
    assert (again.raw, again.deliveries, again.announced) == (b"soon", 1, True)
    assert [raw for _, raw in scripts.parked(keys, "n")] == [b"later"]
    assert scripts.parked(keys, "another node") == []


def test_what_an_earlier_version_left_unacknowledged_or_quarantined_comes_back(
    client: redis.Redis, keys: QueueKeys, scripts: Scripts
) -> None:
    mine, theirs = f"legacy-{uuid.uuid4().hex}", f"legacy-{uuid.uuid4().hex}"
    client.hset("unacked", mapping={
        mine: json.dumps([{"body": "x", "headers": {"id": "old"}}, "", keys.queue]),
        theirs: json.dumps([{"body": "y"}, "", "another-apps-queue"])})
    client.zadd("unacked_index", {mine: time.time() - 100, theirs: time.time() - 100})
    client.lpush(f"{keys.queue}.quarantine", b"garbage")
    try:
        assert scripts.restore_legacy(keys, visibility_timeout=10) == 2
        back = client.lrange(keys.queue, 0, -1)
        assert b"garbage" in back
        assert any(json.loads(raw).get("headers") == {"id": "old"} for raw in back
                   if raw != b"garbage")
        assert client.hexists("unacked", theirs) and not client.hexists("unacked", mine)
    finally:
        client.hdel("unacked", mine, theirs)
        client.zrem("unacked_index", mine, theirs)
        client.delete(f"{keys.queue}.quarantine")
