"""What the benchmark runs: sizes, command mixes, and the command lines of the consumers."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, replace

# The worker measured as "this worker": the production node, as `run`, `consume` and compose
# start it (task events on). Placeholders: {python}, {concurrency}, {queue}.
WORKER_NODE = (
    "{python} -m celery -A worker.celery_app worker -Q {queue} -c {concurrency} -E "
    "--loglevel WARNING"
)
WORKER_COMMAND = WORKER_NODE
NAMED_WORKER_COMMANDS = {"node": WORKER_NODE}

# The tutorial-style baseline (worker/bench/baseline_app.py): prefork, Celery's defaults.
BASELINE_COMMAND = (
    "{python} -m celery -A worker.bench.baseline_app worker -Q {queue} -c {concurrency} "
    "--loglevel WARNING"
)

WORKER_QUEUE = "bench-commands"
BASELINE_QUEUE = "bench-baseline"

# Each mix: task name -> share of the commands.
MIXES: dict[str, dict[str, float]] = {
    "posts.create": {"posts.create": 1.0},
    "tags.create": {"tags.create": 1.0},
    "users.update": {"users.update": 1.0},
    "posts.delete": {"posts.delete": 1.0},
    "mixed": {"posts.create": 0.4, "tags.create": 0.2, "users.update": 0.2,
              "posts.update": 0.1, "posts.delete": 0.1},
    "users.create": {"users.create": 1.0},
}
HEADLINE_MIX = "posts.create"
HASHING_MIX = "users.create"
SOAK_MIX = "mixed"


def cores() -> int:
    """The machine's logical CPUs."""
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Sizes:
    """How much work each phase does."""

    commands: int
    baseline_commands: int
    users_create_seconds: float
    latency_seconds: float
    soak: int
    ceiling_seconds: float
    hash_seconds: float
    stall_seconds: float


FULL = Sizes(commands=40_000, baseline_commands=4_000, users_create_seconds=15,
             latency_seconds=15, soak=100_000, ceiling_seconds=5, hash_seconds=3,
             stall_seconds=60)
QUICK = Sizes(commands=400, baseline_commands=200, users_create_seconds=2,
              latency_seconds=2, soak=2_000, ceiling_seconds=1, hash_seconds=0.5,
              stall_seconds=30)


def sizes(quick: bool, commands: int | None, soak: int | None) -> Sizes:
    """The sizes for a run: full or quick, with explicit counts overriding."""
    chosen = QUICK if quick else FULL
    if commands is not None:
        chosen = replace(chosen, commands=commands,
                         baseline_commands=max(50, min(commands, commands // 5)))
    if soak is not None:
        chosen = replace(chosen, soak=soak)
    return chosen


def command_line(template: str, *, concurrency: int, queue: str) -> list[str]:
    """The argv of a consumer from its template (or the name of one: node)."""
    template = NAMED_WORKER_COMMANDS.get(template, template)
    text = template.format(python=shlex.quote(sys.executable), concurrency=concurrency,
                           queue=shlex.quote(queue))
    return shlex.split(text)
