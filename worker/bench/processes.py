"""Consumer subprocesses (started, paused, stopped) and the CPU and memory of process trees."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil  # type: ignore[import-untyped]

from worker.bench.plan import command_line

ROOT = Path(__file__).resolve().parent.parent.parent


class PhaseError(RuntimeError):
    """A phase of the benchmark could not finish; the message says why."""


class Consumer:
    """A consumer subprocess in its own process group, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log: Path) -> None:
        """Describe it; nothing starts until start()."""
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The pid of the consumer's main process."""
        if self.process is None:
            raise PhaseError(f"the {self.name} is not running")
        return self.process.pid

    def start(self) -> None:
        """Start the process (its own session, so the whole tree can be signalled)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=handle,
                stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        """Whether the main process still runs."""
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        """Raise PhaseError (with the end of its log) if the process has exited."""
        if not self.alive():
            code = self.process.returncode if self.process is not None else None
            raise PhaseError(f"the {self.name} exited (status {code}):\n{self.log_tail()}")

    def log_tail(self, size: int = 3000) -> str:
        """The end of the consumer's log."""
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-size:]
        except OSError:
            return ""

    def pause(self) -> None:
        """SIGSTOP the whole process tree."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the whole process tree."""
        self._signal_group(signal.SIGCONT)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (a graceful stop), then SIGKILL of the whole group if it hangs."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._signal_group(signal.SIGCONT)
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # the children too, whatever happened
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def _signal_group(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def __enter__(self) -> Self:
        """Start it."""
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Stop it."""
        self.stop()


def consumer(name: str, template: str, *, concurrency: int, queue: str, env: dict[str, str],
             log: Path) -> Consumer:
    """A consumer described by a command template (see worker/bench/plan.py)."""
    return Consumer(name, command_line(template, concurrency=concurrency, queue=queue), env, log)


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             watched: Consumer | None = None, interval: float = 0.05) -> None:
    """Poll `condition` until it holds; PhaseError on timeout or if `watched` exits."""
    deadline = time.monotonic() + timeout
    while not condition():
        if watched is not None:
            watched.check_alive()
        if time.monotonic() > deadline:
            tail = f"\n{watched.log_tail()}" if watched is not None else ""
            raise PhaseError(f"{what}: not within {timeout:.0f} s{tail}")
        time.sleep(interval)


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process, its live descendants and its reaped children."""
    if pid is None:
        return None
    try:
        processes = _tree(pid)
    except psutil.NoSuchProcess:
        return None
    total = 0.0
    for index, process in enumerate(processes):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
        if index == 0:
            # Children that exited and were reaped (PostgreSQL backends, replaced consumers).
            total += times.children_user + times.children_system
    return total


def process_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def tree_rss(pid: int) -> dict[int, int]:
    """Resident memory in bytes of each process of the tree rooted at `pid`."""
    sizes: dict[int, int] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        for process in _tree(pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                sizes[process.pid] = int(process.memory_info().rss)
    return sizes


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (all cores, all processes)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by each party, and by the whole machine, at a wall time."""

    consumer: float | None
    postgres: float | None
    redis: float | None
    harness: float
    machine: float
    at: float


@dataclass(frozen=True)
class Meters:
    """Which processes to meter: the consumer, the servers, and the harness's own backends."""

    consumer_pid: int
    postgres_pid: int | None
    redis_pid: int | None
    harness_backends: tuple[int, ...] = ()

    def cpu(self) -> CpuSample:
        """CPU seconds so far; the harness's own PostgreSQL backends count as the harness's."""
        postgres = tree_cpu_seconds(self.postgres_pid)
        backends = sum(process_cpu_seconds(pid) for pid in self.harness_backends)
        if postgres is not None:
            postgres -= backends
        return CpuSample(tree_cpu_seconds(self.consumer_pid), postgres,
                         tree_cpu_seconds(self.redis_pid),
                         process_cpu_seconds(os.getpid()) + backends, machine_busy_seconds(),
                         time.monotonic())


def cpu_ms_per_command(before: CpuSample, after: CpuSample,
                       commands: int) -> dict[str, float | None]:
    """Milliseconds of CPU per command, per party, between two samples."""

    def per_command(start: float | None, end: float | None) -> float | None:
        if start is None or end is None or commands <= 0:
            return None
        return round(max(0.0, end - start) * 1000 / commands, 4)

    return {"worker": per_command(before.consumer, after.consumer),
            "postgres": per_command(before.postgres, after.postgres),
            "redis": per_command(before.redis, after.redis),
            "harness": per_command(before.harness, after.harness),
            "machine": per_command(before.machine, after.machine)}


def machine_load(before: CpuSample, after: CpuSample) -> dict[str, float | None]:
    """How busy the machine was, and how much of that no metered party explains."""
    wall = after.at - before.at
    if wall <= 0:
        return {"busy_pct": None, "unexplained_pct_of_a_core": None}
    busy = after.machine - before.machine
    parties = [(before.consumer, after.consumer), (before.postgres, after.postgres),
               (before.redis, after.redis), (before.harness, after.harness)]
    known = sum(end - start for start, end in parties if start is not None and end is not None)
    return {"busy_pct": round(busy * 100 / (wall * (os.cpu_count() or 1)), 1),
            "unexplained_pct_of_a_core": round(max(0.0, busy - known) * 100 / wall, 1)}
