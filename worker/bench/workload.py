"""The commands a run sends: seeded rows they act on, generated mixes, and how they are queued."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from worker.bench.stack import connect
from worker.protocol import encode

PASSWORD = "bench-password-1"  # noqa: S105 - made-up test data
CONTENT = ("A benchmark post. " * 12).strip()
TOPICS = 20
PUSH_CHUNK = 1_000


@dataclass
class Seeded:
    """What a database was seeded with: authors, tags, and posts kept for updates and deletes."""

    authors: list[int]
    topics: list[str]
    post_ids: list[int]
    _next_post: int = 0

    def take_posts(self, count: int) -> list[int]:
        """`count` seeded posts no earlier run has claimed."""
        taken = self.post_ids[self._next_post:self._next_post + count]
        if len(taken) < count:
            raise ValueError(f"only {len(taken)} seeded posts are left, {count} needed")
        self._next_post += count
        return taken


def allocate(mix: dict[str, float], count: int) -> dict[str, int]:
    """How many of `count` commands each task of `mix` gets (largest remainder)."""
    exact = {task: share * count for task, share in mix.items()}
    counts = {task: int(value) for task, value in exact.items()}
    for task in sorted(exact, key=lambda name: exact[name] - counts[name],
                       reverse=True)[:count - sum(counts.values())]:
        counts[task] += 1
    return counts


def posts_needed(mix: dict[str, float], count: int) -> int:
    """Seeded posts a run of `mix` consumes (its updates and deletes)."""
    counts = allocate(mix, count)
    return counts.get("posts.update", 0) + counts.get("posts.delete", 0)


def seed(url: str, authors: int, posts: int, password_hash: str) -> Seeded:
    """Authors, topic tags and posts (each with one tag) in a migrated, empty database."""
    with contextlib.closing(connect(url)) as connection, connection, \
            connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO users (username, email, hashed_password, version) "
            "SELECT 'author' || i, 'author' || i || '@example.com', %s, 1 "
            "FROM generate_series(1, %s) AS i RETURNING id", (password_hash, authors))
        author_ids = sorted(row[0] for row in cursor.fetchall())
        topics = [f"topic-{i}" for i in range(TOPICS)]
        cursor.execute("INSERT INTO tags (name, version) SELECT unnest(%s::text[]), 1", (topics,))
        cursor.execute(
            "INSERT INTO posts (title, content, author_id, version) "
            "SELECT 'Seeded post ' || i, %s, (%s::int[])[1 + i %% %s], 1 "
            "FROM generate_series(1, %s) AS i RETURNING id",
            (CONTENT, author_ids, len(author_ids), posts))
        post_ids = sorted(row[0] for row in cursor.fetchall())
        cursor.execute(
            "INSERT INTO post_tags (post_id, tag_id) "
            "SELECT p.id, t.id FROM posts p JOIN tags t ON t.name = 'topic-' || (p.id %% %s)",
            (TOPICS,))
        cursor.execute("ANALYZE")
    return Seeded(author_ids, topics, post_ids)


@dataclass
class Batch:
    """One run's commands, keyed by a prefix shared by their command ids (and task ids)."""

    prefix: str
    tasks: list[str]
    kwargs: list[dict[str, Any]]
    counts: dict[str, int]
    targets: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        """How many commands."""
        return len(self.tasks)

    def command_id(self, index: int) -> str:
        """The command id (and task id) of command `index`."""
        return f"{self.prefix}-{index}"

    def encoded(self, queue: str, indexes: Iterable[int] | None = None) -> list[bytes]:
        """The commands as Celery protocol-2 messages for `queue`."""
        chosen = range(len(self.tasks)) if indexes is None else indexes
        return [encode(self.tasks[i], self.kwargs[i], queue=queue, task_id=self.command_id(i))
                for i in chosen]


def build(prefix: str, mix: dict[str, float], count: int, seeded: Seeded,
          rng: random.Random) -> Batch:
    """`count` valid commands of `mix`, shuffled, each with its own command id."""
    counts = allocate(mix, count)
    order = [task for task, many in counts.items() for _ in range(many)]
    rng.shuffle(order)
    targets = {task: seeded.take_posts(counts[task]) for task in ("posts.update", "posts.delete")
               if counts.get(task)}
    cursors = dict.fromkeys(counts, 0)
    batch = Batch(prefix, [], [], counts, targets)
    authors, topics = seeded.authors, seeded.topics
    for index, task in enumerate(order):
        nth = cursors[task]
        cursors[task] += 1
        kwargs: dict[str, Any] = {"command_id": batch.command_id(index)}
        name = batch.command_id(index)
        if task == "posts.create":
            kwargs["data"] = {"title": f"Post {name}", "content": CONTENT,
                              "author_id": authors[nth % len(authors)],
                              "tags": [topics[nth % TOPICS], topics[(nth + 7) % TOPICS]]}
        elif task == "tags.create":
            kwargs["data"] = {"name": f"tag-{name}"}
        elif task == "users.update":
            user = authors[nth % len(authors)]
            kwargs.update(id=user, data={"username": f"user{user}-{name}",
                                         "is_active": nth % 2 == 0})
        elif task == "posts.update":
            kwargs.update(id=targets[task][nth],
                          data={"title": f"Edited {name}", "tags": [topics[nth % TOPICS]]})
        elif task == "posts.delete":
            kwargs.update(id=targets[task][nth])
        elif task == "users.create":
            kwargs["data"] = {"username": f"new-{name}", "email": f"new-{name}@example.com",
                              "password": PASSWORD}
        else:
            raise ValueError(f"no generator for {task}")
        batch.tasks.append(task)
        batch.kwargs.append(kwargs)
    return batch


def push(client: redis.Redis, queue: str, messages: Sequence[bytes]) -> None:
    """LPUSH `messages` in pipelined chunks (consumers pop from the right: FIFO)."""
    pipe = client.pipeline(transaction=False)
    for start in range(0, len(messages), PUSH_CHUNK):
        pipe.lpush(queue, *messages[start:start + PUSH_CHUNK])
        if (start // PUSH_CHUNK) % 10 == 9:
            pipe.execute()
    pipe.execute()


def forget_results(client: redis.Redis, batch: Batch) -> None:
    """Delete the stored task results of `batch` (keeps Redis small across runs)."""
    pipe = client.pipeline(transaction=False)
    keys = [f"celery-task-meta-{batch.command_id(i)}" for i in range(len(batch))]
    for start in range(0, len(keys), PUSH_CHUNK):
        pipe.unlink(*keys[start:start + PUSH_CHUNK])
    pipe.execute()
