"""A command queue's Redis keys, and the scripts that move its messages atomically.

A queue Q is the Redis list Q (plus `Q\\x06\\x16<p>` for each of kombu's priority steps p
above 0, where stock Celery producers put priority messages). A message is never outside
Redis between the list and its acknowledgment:

- TAKE pops a fair share of the waiting messages into Q.unacked (under a tag the script
  issues) and Q.unacked_index (their lease). Nothing is parsed in Redis, so any item can be
  taken and acknowledged, and Lua and Python can never disagree on what an item is. A
  message that goes back to the queue (requeued, restored, promoted) carries its delivery
  count in front of its bytes (`stored`), so every delivery is counted, per copy.
- FINISH stores results, removes the tags and publishes task events in one step.
- REQUEUE puts messages back at once (their pool process died, or the node is stopping);
  RESTORE puts back those whose lease is older than the visibility timeout (their node
  died): a live node renews the lease of the messages it holds (TOUCH), so a long batch is
  never delivered twice while its node lives.
- DELAY parks a message whose time has not come in Q.delayed (no visibility timeout runs
  there, so a countdown of any length is delivered once); PROMOTE hands it back when due.

The scripts live in worker/lua/, one file each.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, NamedTuple

PRIORITY_SEPARATOR = "\x06\x16"
#: kombu's default priority steps for Redis: messages of priority p go to the step <= p.
PRIORITY_STEPS = (0, 3, 6, 9)
#: Bytes of an over-size message's tail returned by TAKE: kombu writes `headers` last.
TAIL_BYTES = 16_384


#: What goes in front of a message that comes back to the queue: "\0cw:<count>[r]:".
_COUNT = re.compile(rb"\A\x00cw:(\d{1,9})(r?):")


def stored(raw: bytes, deliveries: int, announced: bool = False) -> bytes:
    """A message as it goes back to a queue after `deliveries` deliveries (see TAKE).

    `announced`: its task-received event was sent when it was parked.
    """
    return b"\x00cw:%d%s:" % (deliveries, b"r" if announced else b"") + raw


def unstored(item: bytes) -> tuple[int, bool, bytes]:
    """(deliveries so far, announced, the message's own bytes) of a queue item."""
    found = _COUNT.match(item)
    if found is None:
        return 0, False, item
    return int(found.group(1)), found.group(2) == b"r", item[found.end():]


@cache
def script_text(name: str) -> str:
    """The Lua source of one of the scripts in worker/lua/."""
    return resources.files("worker").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class QueueKeys:
    """The Redis keys of one command queue."""

    queue: str
    priority_steps: tuple[int, ...] = PRIORITY_STEPS

    @property
    def lists(self) -> list[str]:
        """The lists messages wait in, in the order they are consumed (priority 0 first)."""
        return [self.queue if step == 0 else f"{self.queue}{PRIORITY_SEPARATOR}{step}"
                for step in sorted(set(self.priority_steps) | {0})]

    @property
    def unacked(self) -> str:
        return f"{self.queue}.unacked"

    @property
    def unacked_index(self) -> str:
        return f"{self.queue}.unacked_index"

    @property
    def tags(self) -> str:
        return f"{self.queue}.tags"

    @property
    def delayed(self) -> str:
        return f"{self.queue}.delayed"

    @property
    def delayed_items(self) -> str:
        return f"{self.queue}.delayed.items"


class Taken(NamedTuple):
    """One message as TAKE returned it: its tag, delivery count and bytes.

    `raw` is None for a message over the size limit; then `size` and `tail` describe it.
    `announced`: its task-received event went out when it was parked.
    (A named tuple: pool jobs carry many, and tuples pickle fastest.)
    """

    queue: str
    tag: str
    deliveries: int
    raw: bytes | None
    size: int
    tail: bytes = b""
    announced: bool = False

    def __repr__(self) -> str:
        # Never the bytes: a message holds passwords, and pools log their jobs' arguments.
        return f"<message {self.tag} of {self.queue!r}, {self.size} bytes>"


@dataclass(frozen=True, slots=True)
class Parked:
    """A message to park until `due` (a Unix time), as `member` of the delayed set."""

    tag: str
    due: float
    member: str


def parked_member(node: str, tag: str) -> str:
    """The delayed-set member of a message parked by `node` (`inspect scheduled` reads it)."""
    return f"{node}|{tag}"


def member_node(member: str) -> str:
    """The node that parked the delayed-set `member`."""
    return member.rpartition("|")[0]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Scripts:
    """The queue scripts, registered once on one Redis client (plain or Sentinel-managed)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._take = client.register_script(script_text("take"))
        self._finish = client.register_script(script_text("finish"))
        self._requeue = client.register_script(script_text("requeue"))
        self._restore = client.register_script(script_text("restore"))
        self._delay = client.register_script(script_text("delay"))
        self._promote = client.register_script(script_text("promote"))
        self._touch = client.register_script(script_text("touch"))
        self._legacy = client.register_script(script_text("legacy"))

    @property
    def finish_script(self) -> Any:
        """The FINISH script object (to call it on another client: the result backend's)."""
        return self._finish

    def take(self, keys: QueueKeys, most: int, sharing: int, max_bytes: int) -> list[Taken]:
        """Up to `most` messages (a 1/`sharing` share of those waiting), now unacknowledged."""
        script_keys, args = self.take_arguments(keys, most, sharing, max_bytes)
        return self.taken(keys, self.run_take(script_keys, args))

    def take_arguments(self, keys: QueueKeys, most: int, sharing: int,
                       max_bytes: int, later: float = 0.0) -> tuple[list[str], list[Any]]:
        """TAKE's keys and arguments (to send it on a connection of one's own: `take_sha`).

        `later`: the most seconds the script may wait in Redis before it runs (queued behind a
        blocking wait); the leases it starts count from then, so that none is shorter than
        the visibility timeout.
        """
        lists = keys.lists
        return ([*lists, keys.unacked, keys.unacked_index, keys.tags],
                [time.time() + later, max_bytes, most, max(1, sharing), len(lists),
                 TAIL_BYTES])

    def run_take(self, script_keys: list[str], args: list[Any]) -> Any:
        """TAKE's raw reply (the script loaded again if Redis lost it)."""
        return self._take(keys=script_keys, args=args)

    @property
    def take_sha(self) -> str:
        """TAKE's SHA-1, for EVALSHA (a Redis that lost it answers NOSCRIPT: call `take`)."""
        return str(self._take.sha)

    @staticmethod
    def taken(keys: QueueKeys, reply: Any) -> list[Taken]:
        """The messages in TAKE's reply."""
        taken = []
        for entry in reply:
            tag, count, announced = _text(entry[0]), int(entry[1]), entry[2] == b"r"
            if len(entry) == 4:
                raw = bytes(entry[3])
                taken.append(Taken(keys.queue, tag, count, raw, len(raw), b"", announced))
            else:
                taken.append(Taken(keys.queue, tag, count, None, int(entry[3]),
                                   bytes(entry[4]), announced))
        return taken

    def requeue(self, keys: QueueKeys, messages: Iterable[Taken], counted: bool = True) -> int:
        """Put `messages` back on their queue now (`counted`: the delivery did not end well)."""
        args: list[Any] = ["0" if counted else "1", *(message.tag for message in messages)]
        if len(args) == 1:
            return 0
        return int(self._requeue(keys=[keys.lists[0], keys.unacked, keys.unacked_index],
                                 args=args))

    def touch(self, keys: QueueKeys, messages: Iterable[Taken]) -> int:
        """Renew the lease of `messages` (still being worked on by a live node)."""
        tags = [message.tag for message in messages]
        if not tags:
            return 0
        return int(self._touch(keys=[keys.unacked_index], args=[time.time(), *tags]))

    def restore(self, keys: QueueKeys, visibility_timeout: float, most: int = 1000) -> int:
        """Put back the messages whose lease is older than `visibility_timeout` seconds."""
        return int(self._restore(
            keys=[keys.lists[0], keys.unacked, keys.unacked_index],
            args=[time.time() - visibility_timeout, most]))

    def restore_legacy(self, keys: QueueKeys, visibility_timeout: float,
                       most: int = 1000) -> int:
        """Put back what earlier versions left in kombu's unacked set and the old quarantine."""
        return int(self._legacy(
            keys=[keys.lists[0], "unacked", "unacked_index", f"{keys.queue}.quarantine"],
            args=[keys.queue, time.time() - visibility_timeout, most]))

    def delay(self, keys: QueueKeys, parked: Sequence[Parked]) -> int:
        """Park messages in the delayed set until their due times."""
        args: list[Any] = []
        for item in parked:
            args += [item.tag, item.due, item.member]
        if not args:
            return 0
        return int(self._delay(
            keys=[keys.unacked, keys.unacked_index, keys.delayed, keys.delayed_items],
            args=args))

    def promote(self, keys: QueueKeys, most: int = 1000) -> tuple[int, float | None]:
        """Move parked messages that are due back to the queue: (how many, next due time)."""
        moved, following = self._promote(
            keys=[keys.lists[0], keys.delayed, keys.delayed_items], args=[time.time(), most])
        return int(moved), float(following) if following not in (b"", "", None) else None

    def parked(self, keys: QueueKeys, node: str, most: int = 1000
               ) -> list[tuple[float, bytes]]:
        """(due time, raw message) of up to `most` messages `node` parked, soonest first."""
        entries = self.client.zrange(keys.delayed, 0, -1, withscores=True)
        mine = [(_text(member), float(score)) for member, score in entries
                if member_node(_text(member)) == node][:most]
        if not mine:
            return []
        raws = self.client.hmget(keys.delayed_items, [member for member, _ in mine])
        return [(due, unstored(bytes(raw))[2]) for (_, due), raw in zip(mine, raws, strict=True)
                if raw is not None]


def finish_arguments(keys: QueueKeys, results: Sequence[tuple[str, str | bytes]],
                     expires: int, settled: Sequence[Taken],
                     publishes: Sequence[tuple[str, bytes | str]]
                     ) -> tuple[list[str], list[Any]]:
    """FINISH's keys and arguments: store `results`, acknowledge `settled`, send `publishes`."""
    script_keys = [key for key, _ in results] + [keys.unacked, keys.unacked_index]
    args: list[Any] = [expires, len(results), *(value for _, value in results), len(settled),
                       *(message.tag for message in settled)]
    for channel, payload in publishes:
        args += [channel, payload]
    return script_keys, args
