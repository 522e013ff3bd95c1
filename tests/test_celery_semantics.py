"""The "One worker" issue's table, against the production consumer: what a stock Celery
producer or operator does works the same on this worker node as on a stock Celery worker.

Two real nodes (`celery -A worker.celery_app worker`) share a Redis database and a queue of
their own (so broadcasts, events and queues never touch the rest of the suite), with a short
BROKER_VISIBILITY_TIMEOUT; each also consumes a queue only it reads. The producer is a bare
Celery app, as any other team's would be; events are read by a stock event receiver, as
Flower reads them. A command is made slow, where a test needs one in flight, by holding a
PostgreSQL row lock on the tag it updates.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery import Celery, chain, chord
from sqlalchemy import create_engine, text

from tests.conftest import (
    ROOT,
    TEST_ENV,
    WORKER,
    WorkerProcess,
    start_worker,
    stop_worker,
    wait_for,
    wait_until_consuming,
)
from worker.broker import QueueKeys
from worker.protocol import encode
from worker.servers import EmbeddedRedis, free_port

pytestmark = pytest.mark.integration

QUEUE = "semantics"
#: Seconds: short, so that delays "longer than the visibility timeout" are short too.
VISIBILITY_TIMEOUT = 3
#: Node A's lock timeout: a command blocked on a row lock is a transient fault after this.
LOCK_TIMEOUT_MS = 1000
READY = ("SUCCESS", "FAILURE", "REVOKED")
#: The Redis database the nodes of this module use (the rest of the suite uses 0).
OWN_DATABASE = 9


def own_database(url: str, number: int = OWN_DATABASE) -> str:
    """`url` (redis://host:port/n) with database `number`."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{number}"))


class Events:
    """Every event the nodes send, as a stock event receiver (Flower's) gets them."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.seen = threading.Event()
        self.changed = threading.Condition()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._capture, daemon=True)

    def start(self) -> None:
        self.thread.start()
        # Subscribed once the first event (a heartbeat, at worst 2 s away) comes in.
        assert self.seen.wait(15), "no event from the nodes"

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(10)

    def _capture(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self._on_event})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.seen.set()
        if "uuid" in event:
            with self.changed:
                self.by_task[event["uuid"]].append(event)
                self.changed.notify_all()

    def of(self, task_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        with self.changed:
            return [event for event in self.by_task.get(task_id, ())
                    if kind is None or event["type"] == kind]

    def wait(self, task_id: str, kind: str, timeout: float = 20) -> dict[str, Any]:
        """The first `kind` event of `task_id`, waiting for it."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = [event for event in self.by_task.get(task_id, ())
                         if event["type"] == kind]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {kind} event for {task_id}; have "
                                         f"{[e['type'] for e in self.by_task.get(task_id, ())]}")
                self.changed.wait(left)


@dataclass
class Cluster:
    """The two nodes, their broker, a producer and what the nodes' events say."""

    a: WorkerProcess
    b: WorkerProcess
    broker: str
    database: str
    producer: Celery
    redis: redis.Redis
    events: Events
    early: dict[str, tuple[str, float]] = field(default_factory=dict)

    def send(self, task: str, queue: str = QUEUE, **options: Any) -> str:
        """Publish `task` as a stock producer does; keyword arguments under `kwargs`."""
        kwargs = options.pop("kwargs")
        return str(self.producer.send_task(task, kwargs=kwargs, queue=queue, **options).id)

    def meta(self, task_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(f"celery-task-meta-{task_id}")
        return json.loads(raw) if raw else None

    def outcome(self, task_id: str, timeout: float = 20) -> dict[str, Any]:
        """The stored result of `task_id` once final (SUCCESS, FAILURE or REVOKED)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            meta = self.meta(task_id)
            if meta is not None and meta["status"] in READY:
                return meta
            time.sleep(0.02)
        raise AssertionError(f"no outcome for {task_id} in {timeout} s")

    def inspect(self, *nodes: WorkerProcess, timeout: float = 2) -> Any:
        destination = [node.name for node in nodes] or None
        return self.producer.control.inspect(destination=destination, timeout=timeout)

    def control(self, command: str, node: WorkerProcess, **arguments: Any) -> Any:
        """Broadcast `command` to `node`; its reply."""
        replies = self.producer.control.broadcast(command, arguments=arguments,
                                                  destination=[node.name], reply=True,
                                                  timeout=3)
        assert replies, f"{node.name} did not answer {command}"
        ((name, reply),) = replies[0].items()
        assert name == node.name
        return reply

    def tag(self, name: str) -> Any:
        return row(self.database, "SELECT id, name, version FROM tags WHERE name = :n", n=name)

    def new_tag(self) -> tuple[int, str]:
        """A tag written straight into the database: (id, name)."""
        name = unique("tag")
        engine = create_engine(self.database)
        with engine.begin() as connection:
            tag_id = connection.execute(text("INSERT INTO tags (name) VALUES (:n) RETURNING id"),
                                        {"n": name}).scalar_one()
        engine.dispose()
        return int(tag_id), name

    def wait_active(self, node: WorkerProcess, task_id: str) -> dict[str, Any]:
        """`task_id` as `inspect active` shows it on `node`, once a pool process runs it.

        (Not from events: the node sends a batch's received and started events with its
        outcomes, when its transaction has ended.)
        """
        def active() -> dict[str, Any] | None:
            replies = self.inspect(node).active() or {}
            found = [r for r in replies.get(node.name, []) if r["id"] == task_id]
            return found[0] if found else None

        found: dict[str, Any] = wait_for(active, message=f"{task_id} never active")
        return found

    @contextmanager
    def tag_locked(self, tag_id: int) -> Iterator[None]:
        """Hold tag `tag_id`'s row lock: a command that updates it waits meanwhile."""
        engine = create_engine(self.database)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1 FROM tags WHERE id = :i FOR UPDATE"),
                                   {"i": tag_id})
                yield
                connection.rollback()
        finally:
            engine.dispose()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def rows(url: str, sql: str, **params: Any) -> list[Any]:
    engine = create_engine(url)
    with engine.connect() as connection:
        found = list(connection.execute(text(sql), params))
    engine.dispose()
    return found


def row(url: str, sql: str, **params: Any) -> Any:
    found = rows(url, sql, **params)
    return found[0] if found else None


def dead_letters(url: str, command_id: str) -> list[Any]:
    return rows(url, "SELECT reason, error FROM dead_letters WHERE command_id = :c",
                c=command_id)


def start_node(database: str, broker: str, log: Path, name: str, *extra: str,
               **env: str) -> WorkerProcess:
    return start_worker(database, broker, log, *extra, name=name, env={
        "COMMANDS_QUEUE": QUEUE, "BROKER_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT), **env})


@pytest.fixture(scope="module")
def cluster(database_url: str, servers: tuple[str, str],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    broker = own_database(servers[1])
    client = redis.Redis.from_url(broker)
    client.flushdb()
    logs = tmp_path_factory.mktemp("semantics")
    with ThreadPoolExecutor(2) as starting:
        # A: a lock wait is a transient fault after 1 s (so `task-retried`). B: autoscaled.
        started_a = starting.submit(start_node, database_url, broker, logs / "a.log",
                                    f"semantics-a-{uuid.uuid4().hex[:6]}@%h",
                                    DB_LOCK_TIMEOUT_MS=str(LOCK_TIMEOUT_MS))
        started_b = starting.submit(start_node, database_url, broker, logs / "b.log",
                                    f"semantics-b-{uuid.uuid4().hex[:6]}@%h", "--autoscale=3,2")
        a, b = started_a.result(), started_b.result()
    producer = Celery("producer", broker=broker, backend=broker)
    producer.conf.update(task_serializer="json", result_serializer="json",
                         accept_content=["json"], result_accept_content=["json"])
    events = Events(producer)
    cluster = Cluster(a, b, broker, database_url, producer, client, events)
    try:
        events.start()
        # A queue each node alone consumes, to reach one node in particular.
        for node, queue in ((a, "semantics-a"), (b, "semantics-b")):
            # Either node may have applied the other's start-up probe: ask until it answers.
            wait_for(lambda node=node: cluster.inspect(node, timeout=1).ping(), timeout=30,
                     message=f"{node.name} does not answer ping")
            reply = cluster.control("add_consumer", node, queue=queue)
            assert "ok" in reply, reply
        # The longest waits start now, so that they overlap the other tests.
        now = time.time()
        for label, delay in (("countdown", VISIBILITY_TIMEOUT + 1.0),
                             ("eta", 5 * VISIBILITY_TIMEOUT + 1.0)):
            name = unique(label)
            options: dict[str, Any] = ({"countdown": delay} if label == "countdown" else
                                       {"eta": datetime.now(UTC) + timedelta(seconds=delay)})
            cluster.early[label] = (cluster.send("tags.create", kwargs={"data": {"name": name}},
                                                 **options), now + delay)
        yield cluster
    finally:
        events.stop()
        with ThreadPoolExecutor(2) as stopping:
            list(stopping.map(stop_worker, (a, b)))
        producer.close()


# --- countdown, eta, expires ---------------------------------------------------------------

def test_a_countdown_is_applied_once_and_not_before_its_time(cluster: Cluster) -> None:
    name = unique("countdown")
    sent = time.time()
    task_id = cluster.send("tags.create", kwargs={"data": {"name": name}}, countdown=2)
    outcome = cluster.outcome(task_id)
    assert outcome["status"] == "SUCCESS" and outcome["result"]["outcome"] == "applied"
    started = cluster.events.wait(task_id, "task-started")
    assert started["timestamp"] >= sent + 2 - 0.05
    assert datetime.fromisoformat(outcome["date_done"]).timestamp() >= sent + 2 - 0.05
    assert cluster.tag(name) is not None


def test_an_eta_is_applied_at_its_time(cluster: Cluster) -> None:
    name = unique("eta")
    eta = datetime.now(UTC) + timedelta(seconds=2)
    task_id = cluster.send("tags.create", kwargs={"data": {"name": name}}, eta=eta)
    assert cluster.outcome(task_id)["status"] == "SUCCESS"
    assert cluster.events.wait(task_id, "task-started")["timestamp"] >= eta.timestamp() - 0.05


def test_inspect_scheduled_lists_a_command_waiting_for_its_eta(cluster: Cluster) -> None:
    eta = datetime.now(UTC) + timedelta(seconds=2)
    task_id = cluster.send("tags.create", queue="semantics-a",
                           kwargs={"data": {"name": unique("scheduled")}}, eta=eta)

    def listed() -> list[Any]:
        scheduled = cluster.inspect(cluster.a).scheduled() or {}
        return [entry for entry in scheduled.get(cluster.a.name, [])
                if entry["request"]["id"] == task_id]

    (entry,) = wait_for(listed, message="not in `inspect scheduled`")
    assert abs(datetime.fromisoformat(entry["eta"]).timestamp() - eta.timestamp()) < 0.01
    assert entry["request"]["name"] == "tags.create"
    assert cluster.outcome(task_id)["status"] == "SUCCESS"


def assert_applied_once_at(cluster: Cluster, task_id: str, due: float, timeout: float,
                           settle: float = 0) -> None:
    """Applied, started once and no earlier than `due`, succeeded once (after `settle` s)."""
    outcome = cluster.outcome(task_id, timeout=timeout)
    assert outcome["status"] == "SUCCESS" and outcome["result"]["outcome"] == "applied"
    time.sleep(settle)
    started = cluster.events.of(task_id, "task-started")
    assert len(started) == 1 and started[0]["timestamp"] >= due - 0.05
    assert len(cluster.events.of(task_id, "task-succeeded")) == 1


def test_a_countdown_longer_than_the_visibility_timeout_is_applied_once(
    cluster: Cluster
) -> None:
    task_id, due = cluster.early["countdown"]
    assert_applied_once_at(cluster, task_id, due, timeout=30,
                           settle=VISIBILITY_TIMEOUT)  # time for a second delivery, were there one


def test_an_eta_five_visibility_timeouts_ahead_is_applied_once_at_its_eta_without_dead_letters(
    cluster: Cluster
) -> None:
    task_id, due = cluster.early["eta"]
    assert_applied_once_at(cluster, task_id, due, timeout=45)
    assert dead_letters(cluster.database, task_id) == []


def test_a_command_whose_expiry_has_passed_is_revoked_and_not_applied(
    cluster: Cluster
) -> None:
    name = unique("expired")
    task_id = cluster.send("tags.create", kwargs={"data": {"name": name}},
                           expires=datetime.now(UTC) - timedelta(seconds=1))
    outcome = cluster.outcome(task_id)
    assert outcome["status"] == "REVOKED"
    assert outcome["result"]["exc_type"] == "TaskRevokedError"
    assert cluster.events.wait(task_id, "task-revoked")["expired"] is True
    assert cluster.tag(name) is None
    assert dead_letters(cluster.database, task_id) == []


def test_a_command_whose_expiry_passes_while_it_waits_is_revoked(cluster: Cluster) -> None:
    name = unique("expires-waiting")
    task_id = cluster.send("tags.create", kwargs={"data": {"name": name}}, countdown=1.5,
                           expires=1)
    assert cluster.outcome(task_id)["status"] == "REVOKED"
    assert cluster.events.wait(task_id, "task-revoked")["expired"] is True
    assert cluster.tag(name) is None


# --- revoke ---------------------------------------------------------------------------------

def test_a_revoked_queued_command_is_skipped_as_revoked_on_every_node(cluster: Cluster) -> None:
    # One command waits on each node's own queue; one revoke reaches both nodes.
    names = {node.name: unique("revoked") for node in (cluster.a, cluster.b)}
    sent = {node.name: cluster.send("tags.create", queue=queue, countdown=1.5,
                                    kwargs={"data": {"name": names[node.name]}})
            for node, queue in ((cluster.a, "semantics-a"), (cluster.b, "semantics-b"))}
    replies = cluster.producer.control.revoke(list(sent.values()), reply=True, timeout=2)
    assert {name for reply in replies for name in reply} == set(sent)
    for node, task_id in sent.items():
        outcome = cluster.outcome(task_id)
        assert outcome["status"] == "REVOKED"
        event = cluster.events.wait(task_id, "task-revoked")
        assert event["hostname"] == node and event["expired"] is False
        assert cluster.events.of(task_id, "task-started") == []
        assert cluster.tag(names[node]) is None
    revoked = cluster.inspect(cluster.a, cluster.b).revoked()
    assert all(set(sent.values()) <= set(revoked[node]) for node in sent)


def test_revoke_with_terminate_stops_the_running_command_and_reports_it_revoked(
    cluster: Cluster
) -> None:
    tag_id, name = cluster.new_tag()
    with cluster.tag_locked(tag_id):
        task_id = cluster.send("tags.update", queue="semantics-a",
                               kwargs={"id": tag_id, "data": {"name": unique("never")}})
        cluster.wait_active(cluster.a, task_id)
        reply = cluster.control("revoke", cluster.a, task_id=task_id, terminate=True)
        assert reply == {"ok": f"terminate: {task_id}"}
    outcome = cluster.outcome(task_id)
    assert outcome["status"] == "REVOKED"
    assert cluster.events.wait(task_id, "task-revoked")["hostname"] == cluster.a.name
    assert cluster.tag(name).version == 1


def test_the_node_loads_the_database_driver_before_its_pool_forks(cluster: Cluster) -> None:
    # A pool process that imported psycopg2 at its first transaction swallowed a SIGTERM
    # (revoke --terminate) that came meanwhile, in the driver's C module initialisation.
    maps = Path(f"/proc/{cluster.a.process.pid}/maps").read_text()
    assert "psycopg2/_psycopg" in maps


def test_revoke_by_stamped_headers_skips_waiting_commands_and_terminates_a_running_one(
    cluster: Cluster
) -> None:
    campaign = unique("campaign")

    def stamped(task: str, stamp: str, **options: Any) -> str:
        return cluster.send(task, queue="semantics-a", stamped_headers=["campaign"],
                            campaign=stamp, **options)

    names = [unique("stamped") for _ in range(3)]
    waiting = stamped("tags.create", campaign, countdown=1.5,
                      kwargs={"data": {"name": names[0]}})
    spared = stamped("tags.create", unique("other-campaign"), countdown=1.5,
                     kwargs={"data": {"name": names[1]}})
    tag_id, name = cluster.new_tag()
    with cluster.tag_locked(tag_id):
        running = stamped("tags.update", campaign, kwargs={"id": tag_id,
                                                          "data": {"name": names[2]}})
        cluster.wait_active(cluster.a, running)
        reply = cluster.control("revoke_by_stamped_headers", cluster.a,
                                headers={"campaign": campaign}, terminate=True)
        assert reply["ok"].endswith(" revoked") and campaign in reply["ok"], reply
        assert "not terminated" not in reply["ok"]
    for task_id in (waiting, running):
        assert cluster.outcome(task_id)["status"] == "REVOKED"
        assert cluster.events.wait(task_id, "task-revoked")["hostname"] == cluster.a.name
    assert cluster.outcome(spared)["status"] == "SUCCESS"
    assert cluster.tag(names[0]) is None and cluster.tag(names[1]) is not None
    assert cluster.tag(name).version == 1


# --- canvas, ignore_result, results ---------------------------------------------------------

def tag_signature(cluster: Cluster, name: str) -> Any:
    return cluster.producer.signature("tags.create", kwargs={"data": {"name": name}},
                                      queue=QUEUE, immutable=True)


def test_immutable_link_and_link_error_run(cluster: Cluster) -> None:
    callback, errback = tag_signature(cluster, unique("link")), tag_signature(
        cluster, unique("link-error"))
    callback.freeze()
    errback.freeze()
    applied = cluster.send("tags.create", kwargs={"data": {"name": unique("parent")}},
                           link=callback)
    rejected = cluster.send("tags.create", kwargs={"data": {"name": ""}}, link_error=errback)
    assert cluster.outcome(applied)["status"] == "SUCCESS"
    assert cluster.outcome(rejected)["status"] == "FAILURE"
    for signature in (callback, errback):
        outcome = cluster.outcome(signature.id)
        assert outcome["status"] == "SUCCESS", outcome
        assert cluster.tag(signature.kwargs["data"]["name"]) is not None


def test_a_chain_of_three_immutable_commands_runs_in_order(cluster: Cluster) -> None:
    names = [unique(f"chain-{step}") for step in range(3)]
    result = chain(*(tag_signature(cluster, name) for name in names)).apply_async()
    last = result.get(timeout=30)
    assert last["data"]["name"] == names[2]
    ids = [result.parent.parent.get(timeout=5)["id"], result.parent.get(timeout=5)["id"],
           last["id"]]
    assert ids == sorted(ids)  # each created after the one before
    assert [cluster.tag(name).id for name in names] == ids


def test_a_chord_runs_its_body_after_its_header(cluster: Cluster) -> None:
    header = [tag_signature(cluster, unique("chord-part")) for _ in range(3)]
    body_name = unique("chord-body")
    result = chord(header)(tag_signature(cluster, body_name))
    body = result.get(timeout=30)
    assert body["data"]["name"] == body_name
    parts = [cluster.tag(signature.kwargs["data"]["name"]) for signature in header]
    assert all(part is not None and part.id < body["id"] for part in parts)


def test_ignore_result_stores_nothing(cluster: Cluster) -> None:
    name = unique("ignored")
    task_id = cluster.send("tags.create", kwargs={"data": {"name": name}}, ignore_result=True)
    cluster.events.wait(task_id, "task-succeeded")
    assert cluster.tag(name) is not None
    time.sleep(0.2)
    assert cluster.redis.exists(f"celery-task-meta-{task_id}") == 0


def test_results_are_celery_metas_and_a_failure_keeps_its_traceback(cluster: Cluster) -> None:
    applied = cluster.producer.send_task("tags.create", queue=QUEUE,
                                         kwargs={"data": {"name": unique("meta")}})
    rejected = cluster.producer.send_task("tags.create", queue=QUEUE,
                                          kwargs={"data": {"name": "x" * 51}})
    assert applied.get(timeout=20)["outcome"] == "applied"
    with pytest.raises(Exception) as raised:
        rejected.get(timeout=20)
    assert type(raised.value).__name__ == "Invalid"
    assert str(raised.value).startswith("invalid:")
    assert rejected.state == "FAILURE"
    assert rejected.traceback.startswith("Traceback (most recent call last):")
    assert "worker.errors.Invalid: invalid:" in rejected.traceback
    meta = cluster.meta(rejected.id)
    assert meta is not None
    assert set(meta) >= {"status", "result", "traceback", "children", "date_done", "task_id"}
    assert meta["result"]["exc_module"] == "worker.errors"


# --- inspect and control --------------------------------------------------------------------

def test_inspect_and_celery_status_get_replies_from_both_nodes(cluster: Cluster) -> None:
    nodes = {cluster.a.name, cluster.b.name}
    inspect = cluster.inspect(cluster.a, cluster.b)
    assert inspect.ping() == {name: {"ok": "pong"} for name in nodes}
    stats = inspect.stats()
    assert set(stats) == nodes
    assert all(stats[name]["pool"]["implementation"].endswith("prefork:TaskPool")
               and stats[name]["batch_size"] == 50 for name in nodes)
    registered = inspect.registered()
    assert all("tags.create" in registered[name] and len(registered[name]) == 9
               for name in nodes)
    queues = inspect.active_queues()
    assert {q["name"] for q in queues[cluster.a.name]} == {QUEUE, "semantics-a"}
    assert {q["name"] for q in queues[cluster.b.name]} == {QUEUE, "semantics-b"}
    assert set(inspect.revoked()) == nodes
    assert set(inspect.active()) == set(inspect.reserved()) == nodes
    status = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "status"],
        cwd=ROOT, env={**os.environ, **TEST_ENV, "BROKER_URL": cluster.broker,
                       "DATABASE_URL": cluster.database, "COMMANDS_QUEUE": QUEUE},
        capture_output=True, text=True, timeout=60, check=False)
    assert status.returncode == 0, status.stderr
    assert f"{cluster.a.name}: OK" in status.stdout
    assert f"{cluster.b.name}: OK" in status.stdout
    assert "2 nodes online." in status.stdout


def test_inspect_active_and_reserved_show_each_command_in_flight(cluster: Cluster) -> None:
    tag_id, _ = cluster.new_tag()
    messages = [encode("tags.update", {"id": tag_id, "data": {"name": unique("in")}},
                       queue="semantics-a") for _ in range(300)]
    task_ids = [json.loads(message)["headers"]["id"] for message in messages]
    with cluster.tag_locked(tag_id):
        # A queue this full keeps the node busy: besides a batch in each pool process, it
        # takes one more batch per process ahead (reserved), as Celery prefetches.
        cluster.redis.lpush("semantics-a", *messages)

        def in_flight() -> tuple[list[Any], list[Any]] | None:
            inspect = cluster.inspect(cluster.a)
            active = (inspect.active() or {}).get(cluster.a.name, [])
            reserved = (inspect.reserved() or {}).get(cluster.a.name, [])
            return (active, reserved) if len(active) == len(reserved) == 100 else None

        active, reserved = wait_for(in_flight, message="not 100 active and 100 reserved")
        active_ids, reserved_ids = {r["id"] for r in active}, {r["id"] for r in reserved}
        assert active_ids | reserved_ids <= set(task_ids) and not active_ids & reserved_ids
        assert {r["worker_pid"] for r in active} == set(
            cluster.inspect(cluster.a).stats()[cluster.a.name]["pool"]["processes"])
        assert all(r["worker_pid"] is None for r in reserved)
        entry = active[0]
        assert entry["name"] == "tags.update" and str(tag_id) in entry["kwargs"]
        assert entry["delivery_info"]["routing_key"] == "semantics-a"
    metas = wait_for(lambda: (lambda found: found if all(found) else None)(
        cluster.redis.mget([f"celery-task-meta-{task_id}" for task_id in task_ids])),
        timeout=60, message="not every command has an outcome")
    assert {json.loads(meta)["status"] for meta in metas} == {"SUCCESS"}


def test_rate_limit_spaces_commands_out_and_is_lifted(cluster: Cluster) -> None:
    assert cluster.control("rate_limit", cluster.a, task_name="tags.create",
                           rate_limit="4/s") == {"ok": "new rate limit set successfully"}
    try:
        task_ids = [cluster.send("tags.create", queue="semantics-a",
                                 kwargs={"data": {"name": unique("rate")}}) for _ in range(5)]
        starts = sorted(cluster.events.wait(task_id, "task-started")["timestamp"]
                        for task_id in task_ids)
        # A bucket of one token, four a second: the fifth starts a second after the first.
        assert starts[-1] - starts[0] >= 0.9
        assert all(cluster.outcome(task_id)["status"] == "SUCCESS" for task_id in task_ids)
    finally:
        lifted = cluster.control("rate_limit", cluster.a, task_name="tags.create",
                                 rate_limit=None)
    assert lifted == {"ok": "rate limit disabled successfully"}


def test_pool_grow_and_pool_shrink_change_the_pool(cluster: Cluster) -> None:
    def processes() -> int:
        stats = cluster.inspect(cluster.a).stats() or {}
        return len(stats[cluster.a.name]["pool"]["processes"])

    assert processes() == 2
    assert cluster.control("pool_grow", cluster.a, n=1) == {"ok": "pool will grow"}
    wait_for(lambda: processes() == 3, message="the pool did not grow")
    assert cluster.control("pool_shrink", cluster.a, n=1) == {"ok": "pool will shrink"}
    wait_for(lambda: processes() == 2, message="the pool did not shrink")
    task_id = cluster.send("tags.create", queue="semantics-a",
                           kwargs={"data": {"name": unique("pool")}})
    assert cluster.outcome(task_id)["status"] == "SUCCESS"


def test_autoscale_is_obeyed_where_enabled_and_refused_with_the_reason_elsewhere(
    cluster: Cluster
) -> None:
    assert cluster.control("autoscale", cluster.b, max=4, min=2) == {
        "ok": "autoscale now max=4 min=2"}
    stats = cluster.inspect(cluster.b).stats()[cluster.b.name]
    assert (stats["autoscaler"]["max"], stats["autoscaler"]["min"]) == (4, 2)
    assert cluster.control("autoscale", cluster.a, max=4, min=2) == {
        "error": "ValueError('Autoscale not enabled')"}


def test_add_consumer_of_a_second_queue_takes_it_atomically_and_cancel_consumer_stops_it(
    cluster: Cluster
) -> None:
    extra = unique("semantics-extra")
    keys = QueueKeys(extra)
    assert cluster.control("add_consumer", cluster.a, queue=extra) == {
        "ok": f"add consumer {extra}"}
    tag_id, _ = cluster.new_tag()
    with cluster.tag_locked(tag_id):
        held = cluster.send("tags.update", queue=extra,
                            kwargs={"id": tag_id, "data": {"name": unique("extra")}})
        cluster.wait_active(cluster.a, held)
        # Taken by the node's Lua TAKE: the message sits in the queue's unacknowledged set.
        assert cluster.redis.hlen(keys.unacked) == 1
        assert cluster.redis.zcard(keys.unacked_index) == 1
        assert cluster.redis.llen(extra) == 0
    outcome = cluster.outcome(held)
    assert outcome["status"] == "SUCCESS" and outcome["result"]["outcome"] == "applied"
    assert cluster.events.wait(held, "task-succeeded")["hostname"] == cluster.a.name
    assert cluster.redis.hlen(keys.unacked) == cluster.redis.zcard(keys.unacked_index) == 0
    assert int(cluster.redis.get(keys.tags) or 0) == 1

    assert cluster.control("cancel_consumer", cluster.a, queue=extra) == {
        "ok": f"no longer consuming from {extra}"}
    queues = cluster.inspect(cluster.a).active_queues()[cluster.a.name]
    assert extra not in {queue["name"] for queue in queues}
    left = cluster.send("tags.create", queue=extra, kwargs={"data": {"name": unique("left")}})
    time.sleep(1.5)
    assert cluster.redis.llen(extra) == 1 and cluster.meta(left) is None
    cluster.redis.delete(extra)


def test_time_limit_control_sets_a_limit_the_next_commands_meet(cluster: Cluster) -> None:
    assert cluster.control("time_limit", cluster.a, task_name="tags.update", soft=1,
                           hard=30) == {"ok": "time limits set successfully"}
    try:
        tag_id, name = cluster.new_tag()
        with cluster.tag_locked(tag_id):
            task_id = cluster.send("tags.update", queue="semantics-a",
                                   kwargs={"id": tag_id, "data": {"name": unique("late")}})
            cluster.wait_active(cluster.a, task_id)
            time.sleep(2)
        outcome = cluster.outcome(task_id)
    finally:
        cluster.control("time_limit", cluster.a, task_name="tags.update", soft=None, hard=None)
    assert outcome["status"] == "FAILURE"
    assert outcome["result"]["exc_type"] == "TimeLimitExceeded"
    assert cluster.tag(name).version == 1


def test_a_command_over_its_soft_time_limit_fails_as_time_limit_exceeded_with_a_dead_letter(
    cluster: Cluster
) -> None:
    tag_id, name = cluster.new_tag()
    with cluster.tag_locked(tag_id):
        task_id = cluster.send("tags.update", queue="semantics-a", soft_time_limit=1,
                               kwargs={"id": tag_id, "data": {"name": unique("slow")}})
        cluster.wait_active(cluster.a, task_id)
        time.sleep(2)
    outcome = cluster.outcome(task_id)
    assert outcome["status"] == "FAILURE"
    assert outcome["result"]["exc_type"] == "TimeLimitExceeded"
    assert "TimeLimitExceeded" in outcome["traceback"]
    assert "TimeLimitExceeded" in cluster.events.wait(task_id, "task-failed")["exception"]
    ((reason, error),) = dead_letters(cluster.database, task_id)
    assert reason == "retries_exhausted" and "time limit" in error
    assert cluster.tag(name).version == 1
    # The command met its limit in the database; the pool's own soft limit (a backstop a
    # moment later) had nothing left to stop, and its callback raised nothing.
    assert "Pool callback raised exception" not in cluster.a.log_text()


def test_disable_events_and_enable_events_are_obeyed(cluster: Cluster) -> None:
    def applied_silently() -> bool:
        task_id = cluster.send("tags.create", queue="semantics-a",
                               kwargs={"data": {"name": unique("quiet")}})
        assert cluster.outcome(task_id)["status"] == "SUCCESS"
        time.sleep(0.5)  # events, were there any, come with the outcome
        return cluster.events.of(task_id) == []

    try:
        assert cluster.control("disable_events", cluster.a) == {"ok": "task events disabled"}
        assert applied_silently()
        assert cluster.control("disable_events", cluster.a) == {
            "ok": "task events already disabled"}
    finally:
        enabled = cluster.control("enable_events", cluster.a)
    assert enabled == {"ok": "task events enabled"}
    assert not applied_silently()
    assert cluster.control("enable_events", cluster.a) == {"ok": "task events already enabled"}


def test_a_command_over_its_hard_time_limit_fails_at_once_as_time_limit_exceeded(
    cluster: Cluster
) -> None:
    tag_id, name = cluster.new_tag()
    with cluster.tag_locked(tag_id):  # node B waits for a lock up to 10 s: no soft limit helps
        task_id = cluster.send("tags.update", queue="semantics-b", time_limit=1,
                               kwargs={"id": tag_id, "data": {"name": unique("killed")}})
        time.sleep(3)
    outcome = cluster.outcome(task_id)
    assert (outcome["status"], outcome["result"].get("exc_type")) == (
        "FAILURE", "TimeLimitExceeded")
    assert cluster.tag(name).version == 1


# --- priorities, purge ----------------------------------------------------------------------

def test_priority_messages_are_all_consumed_and_none_is_left_in_redis(cluster: Cluster) -> None:
    task_ids = [cluster.send("tags.create", kwargs={"data": {"name": unique(f"p{priority}")}},
                             priority=priority) for priority in (0, 3, 5, 6, 9)]
    assert all(cluster.outcome(task_id)["status"] == "SUCCESS" for task_id in task_ids)
    assert all(cluster.redis.llen(queue) == 0 for queue in QueueKeys(QUEUE).lists)
    assert cluster.redis.keys(f"{QUEUE}\x06\x16*") == []


def test_celery_purge_removes_priority_messages_too(cluster: Cluster) -> None:
    queue = unique("semantics-purge")  # consumed by no node
    for priority in (0, 5, 9):
        cluster.send("tags.create", queue=queue, priority=priority,
                     kwargs={"data": {"name": unique("purged")}})
    lists = QueueKeys(queue).lists
    assert sum(cluster.redis.llen(name) for name in lists) == 3
    purge = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "purge", "-f", "-Q", queue],
        cwd=ROOT, env={**os.environ, **TEST_ENV, "BROKER_URL": cluster.broker,
                       "DATABASE_URL": cluster.database, "COMMANDS_QUEUE": queue},
        capture_output=True, text=True, timeout=60, check=False)
    assert purge.returncode == 0, purge.stderr
    assert "Purged 3 messages" in purge.stdout
    assert sum(cluster.redis.llen(name) for name in lists) == 0


# --- compression ----------------------------------------------------------------------------

def test_a_gzip_compressed_command_is_decompressed_and_applied(cluster: Cluster) -> None:
    name = unique("gzip")
    task_id = cluster.send("tags.create", kwargs={"data": {"name": name}}, compression="gzip")
    outcome = cluster.outcome(task_id)
    assert outcome["status"] == "SUCCESS" and outcome["result"]["data"]["name"] == name


def test_a_compression_bomb_is_refused_as_invalid(cluster: Cluster) -> None:
    task_id = str(uuid.uuid4())
    message = json.loads(encode("tags.create", {}, queue=QUEUE, task_id=task_id))
    # 64 MB of JSON in 64 KB: far past the 1 MB limit once inflated.
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(b'[[], {"data": {"name": "')]
    chunk = b"a" * (1 << 20)
    parts += [compressor.compress(chunk) for _ in range(64)]
    parts.append(compressor.compress(b'"}}, {}]') + compressor.flush())
    message["body"] = base64.b64encode(b"".join(parts)).decode()
    message["headers"]["compression"] = "application/x-gzip"
    cluster.redis.lpush(QUEUE, json.dumps(message))
    outcome = cluster.outcome(task_id)
    assert outcome["status"] == "FAILURE"
    assert outcome["result"]["exc_type"] == "Invalid"
    assert "decompresses to more than the limit" in outcome["result"]["exc_message"][0]
    # Its arguments are never read: its dead letter is filed under its task id.
    assert [reason for reason, _ in dead_letters(cluster.database, task_id)] == ["invalid"]


# --- task events ----------------------------------------------------------------------------

def test_each_command_of_a_batch_has_its_own_received_started_and_succeeded_events(
    cluster: Cluster
) -> None:
    names = [unique("batch") for _ in range(20)]
    messages = [encode("tags.create", {"data": {"name": name}}, queue=QUEUE) for name in names]
    cluster.redis.lpush(QUEUE, *messages)  # waiting together: taken as batches
    task_ids = [json.loads(message)["headers"]["id"] for message in messages]
    for task_id, name in zip(task_ids, names, strict=True):
        succeeded = cluster.events.wait(task_id, "task-succeeded")
        kinds = [event["type"] for event in cluster.events.of(task_id)]
        assert kinds == ["task-received", "task-started", "task-succeeded"]
        received = cluster.events.of(task_id, "task-received")[0]
        assert received["name"] == "tags.create" and name in received["kwargs"]
        assert name in succeeded["result"]
        assert 0 < succeeded["runtime"] < 5


def test_a_rejected_command_sends_task_failed_with_its_traceback(cluster: Cluster) -> None:
    task_id = cluster.send("tags.create", kwargs={"data": {"name": "", "password": "hunter2"}})
    failed = cluster.events.wait(task_id, "task-failed")
    assert failed["exception"].startswith("Invalid(")
    assert failed["traceback"].startswith("Traceback (most recent call last):")
    assert "hunter2" not in json.dumps(cluster.events.of(task_id))


def test_a_transient_fault_sends_task_retried_then_task_succeeded(cluster: Cluster) -> None:
    tag_id, _ = cluster.new_tag()
    new_name = unique("retried")
    with cluster.tag_locked(tag_id):
        task_id = cluster.send("tags.update", queue="semantics-a",
                               kwargs={"id": tag_id, "data": {"name": new_name}})
        cluster.wait_active(cluster.a, task_id)
        # Node A's lock timeout (1 s) ends the wait with a transient fault: retried.
        time.sleep(2.5)
    assert cluster.outcome(task_id)["status"] == "SUCCESS"
    cluster.events.wait(task_id, "task-succeeded")
    kinds = [event["type"] for event in cluster.events.of(task_id)]
    assert kinds[:2] == ["task-received", "task-started"] and kinds[-1] == "task-succeeded"
    retried = cluster.events.of(task_id, "task-retried")
    assert retried and all("OperationalError" in event["exception"] for event in retried)
    assert set(kinds[2:-1]) == {"task-retried"}
    assert cluster.tag(new_name).version == 2


def test_task_started_is_sent_while_the_command_runs(cluster: Cluster) -> None:
    tag_id, _ = cluster.new_tag()
    with cluster.tag_locked(tag_id):
        task_id = cluster.send("tags.update", queue="semantics-b",
                               kwargs={"id": tag_id, "data": {"name": unique("running")}})
        cluster.wait_active(cluster.b, task_id)
        time.sleep(2)  # the lock holds the command meanwhile
        started = cluster.events.of(task_id, "task-started")
    assert cluster.outcome(task_id)["status"] == "SUCCESS"
    assert started, "no task-started while the command ran"


def test_a_delayed_command_has_one_task_received_event(cluster: Cluster) -> None:
    task_id = cluster.send("tags.create", kwargs={"data": {"name": unique("once")}},
                           countdown=1)
    cluster.events.wait(task_id, "task-succeeded")
    kinds = [event["type"] for event in cluster.events.of(task_id)]
    assert kinds == ["task-received", "task-started", "task-succeeded"]


# --- nodes of their own ---------------------------------------------------------------------

def test_control_shutdown_stops_the_node_it_names_only(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = start_worker(cluster.database, cluster.broker, tmp_path / "c.log",
                        name=f"semantics-c-{uuid.uuid4().hex[:6]}@%h",
                        env={"COMMANDS_QUEUE": unique("semantics-c")})
    try:
        cluster.producer.control.shutdown(destination=[node.name])
        assert node.process.wait(30) == 0
        assert "shutdown" in node.log_text().lower()
        assert cluster.inspect(cluster.a, cluster.b).ping() == {
            cluster.a.name: {"ok": "pong"}, cluster.b.name: {"ok": "pong"}}
    finally:
        stop_worker(node)


@contextmanager
def sentinel(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, int]]:
    """A Redis master and one sentinel watching it as `mymaster`: (master, sentinel port)."""
    from worker.servers import _redis_server_bin

    with EmbeddedRedis(tmp_path / "master", appendonly=False) as master:
        port = free_port()
        config = tmp_path / "sentinel.conf"  # a sentinel rewrites its own configuration
        config.write_text(f"port {port}\nbind 127.0.0.1\nprotected-mode no\n"
                          f"dir {tmp_path}\nsentinel monitor mymaster 127.0.0.1 "
                          f"{master.port} 1\n")
        with (tmp_path / "sentinel.log").open("wb") as log:
            process = subprocess.Popen([str(_redis_server_bin()), str(config), "--sentinel"],
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            client = redis.Redis(port=port)
            wait_for(lambda: _masters(client), message="the sentinel never answered")
            yield master, port
        finally:
            process.terminate()
            process.wait(10)


def _masters(client: redis.Redis) -> Any:
    try:
        return client.sentinel_masters()
    except redis.ConnectionError:
        return None


def test_a_node_on_redis_sentinel_applies_commands_and_runs_their_errbacks(
    database_url: str, tmp_path: Path
) -> None:
    with sentinel(tmp_path) as (master, port):
        url = f"sentinel://127.0.0.1:{port}/0"
        queue = "semantics-sentinel"
        env = {**os.environ, **TEST_ENV, "DATABASE_URL": database_url, "BROKER_URL": url,
               "BROKER_SENTINEL_MASTER": "mymaster", "COMMANDS_QUEUE": queue}
        env.pop("RESULT_BACKEND", None)  # results go where the broker is: through sentinel
        name = f"semantics-sentinel-{uuid.uuid4().hex[:6]}@%h"
        log = tmp_path / "node.log"
        with log.open("wb") as output:
            process = subprocess.Popen([sys.executable, *WORKER, "-n", name], cwd=ROOT, env=env,
                                       stdout=output, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        node = WorkerProcess(process, log, name.replace("%h", os.uname().nodename))
        try:
            assert wait_until_consuming(node, master.url, queue), node.log_text()
            producer = Celery("producer", broker=url, backend=url)
            producer.conf.update(
                task_serializer="json", accept_content=["json"], result_accept_content=["json"],
                broker_transport_options={"master_name": "mymaster"},
                result_backend_transport_options={"master_name": "mymaster"})
            applied = producer.send_task("tags.create", queue=queue,
                                         kwargs={"data": {"name": unique("sentinel")}})
            assert applied.get(timeout=20)["outcome"] == "applied"
            # An errback is sent by Celery's result backend (after it stores the failure),
            # which must find the master through the sentinel too.
            errback = producer.signature("tags.create", queue=queue, immutable=True,
                                         kwargs={"data": {"name": unique("sentinel-errback")}})
            errback.freeze()
            rejected = producer.send_task("tags.create", queue=queue, link_error=errback,
                                          kwargs={"data": {"name": ""}})
            assert producer.AsyncResult(errback.id).get(timeout=20)["outcome"] == "applied"
            assert rejected.state == "FAILURE"
            replies = producer.control.inspect(destination=[node.name], timeout=2).ping()
            assert replies == {node.name: {"ok": "pong"}}
            producer.close()
        finally:
            stop_worker(node)
        assert "Traceback" not in node.log_text()
