"""The servers a benchmark runs on (given or throwaway) and its scratch databases."""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import psycopg2  # type: ignore[import-untyped]
import redis
from sqlalchemy import make_url

from worker.db import sync_url

LOCAL_HOSTS = frozenset({None, "", "localhost", "127.0.0.1", "::1"})


@dataclass
class Stack:
    """PostgreSQL and Redis in use, their server pids when local, and the databases made."""

    server_url: str
    broker_url: str
    postgres_pid: int | None
    redis_pid: int | None
    throwaway: bool
    databases: list[str] = field(default_factory=list)

    def create_database(self, purpose: str) -> str:
        """A new empty database on the server (dropped at the end); its SQLAlchemy URL."""
        name = f"bench_{purpose}_{uuid.uuid4().hex[:8]}"
        with contextlib.closing(connect(self.server_url)) as connection:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return database_url(self.server_url, name)

    def drop_databases(self) -> None:
        """Drop every database this benchmark created (closing what is still connected)."""
        with contextlib.closing(connect(self.server_url)) as connection:
            connection.autocommit = True
            with connection.cursor() as cursor:
                for name in self.databases:
                    cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.databases.clear()


def database_url(server_url: str, name: str) -> str:
    """`server_url` pointed at database `name`, with the psycopg2 driver."""
    url = make_url(sync_url(server_url)).set(database=name)
    return url.render_as_string(hide_password=False)


def libpq_dsn(url: str) -> str:
    """The libpq connection string of a SQLAlchemy URL."""
    parsed = make_url(url)
    parts = {"host": parsed.host or "127.0.0.1", "port": parsed.port or 5432,
             "user": parsed.username, "password": parsed.password, "dbname": parsed.database}
    return " ".join(f"{key}='{value}'" for key, value in parts.items() if value is not None)


def connect(url: str) -> psycopg2.extensions.connection:
    """A psycopg2 connection to the database of SQLAlchemy URL `url`."""
    return psycopg2.connect(libpq_dsn(url), application_name="command-worker-bench")


def _local(url: str) -> bool:
    return make_url(url).host in LOCAL_HOSTS


def postmaster_pid(url: str) -> int | None:
    """The pid of the PostgreSQL server of `url`, when it runs on this machine."""
    if not _local(url):
        return None
    try:
        with contextlib.closing(connect(url)) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            backend = int(cursor.fetchone()[0])
        return int(psutil.Process(backend).ppid())
    except (psycopg2.Error, psutil.Error):
        return None


def redis_pid(url: str) -> int | None:
    """The pid of the Redis server of `url`, when it runs on this machine."""
    if not _local(url):
        return None
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        pid = int(client.info("server")["process_id"])
        psutil.Process(pid)
        return pid
    except (redis.RedisError, KeyError, ValueError, psutil.Error):
        return None
    finally:
        client.close()


# The throwaway PostgreSQL: durable as configured by default (fsync, synchronous_commit, full
# page writes), plus:
# - commit timestamps, which give each command's latency up to its commit (measure.py);
# - WAL I/O timing, which tells how long commits waited for the disk (measure.WalFlushes);
# - wal_init_zero=off: a new cluster has no WAL segment to recycle, so it creates every one,
#   and zero-filling a new 16 MB segment holds up every commit meanwhile (30-80 ms here,
#   several times a phase), which a long-running server that recycles its segments seldom
#   does; new segments are only extended;
# - min_wal_size=2GB (max_wal_size=4GB): the segments earlier runs filled are kept for reuse,
#   as a busy long-running server's are, instead of new ones being created mid-run;
# - autovacuum=off: a run lasts seconds, and an autovacuum of the tables the runs before
#   filled (seen landing mid-run: 80 ms stalls in the latency phase) would make a run's
#   figures depend on where the autovacuum cycle falls. Every run starts after an explicit
#   VACUUM (ANALYZE) and CHECKPOINT instead (measure.Monitor.checkpoint), unmeasured.
SETTINGS = {"track_commit_timestamp": "on", "track_wal_io_timing": "on", "wal_init_zero": "off",
            "min_wal_size": "2GB", "max_wal_size": "4GB", "autovacuum": "off"}


# The throwaway Redis keeps nothing on disk by default, as this machine's Redis (and CI's):
# with an append-only file on the disk PostgreSQL's WAL is on, Redis's once-a-second fsync of
# what it appended (some 4 KB a command: the message, its unacknowledged copy, the result;
# 8 MB a second at 2,000 commands a second) holds up every PostgreSQL commit for 40-55 ms
# here, once a second: a figure of the disk both share, not of either consumer (each does
# the same Redis work either way). `--redis-aof` measures with it.


@contextmanager
def open_stack(server_url: str | None, broker_url: str | None,
               data_dir: Path | None = None, redis_aof: bool = False) -> Iterator[Stack]:
    """The given servers, or throwaway ones (Redis with an append-only file if `redis_aof`)."""
    with ExitStack() as exits:
        throwaway = not (server_url and broker_url)
        base = data_dir
        if throwaway and base is None:
            base = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        if not server_url:
            from worker.servers import EmbeddedPostgres

            assert base is not None
            postgres = exits.enter_context(EmbeddedPostgres(base / "postgres", settings=SETTINGS))
            server_url = postgres.url
        if not broker_url:
            from worker.servers import EmbeddedRedis

            assert base is not None
            redis_server = exits.enter_context(EmbeddedRedis(base / "redis", appendonly=redis_aof))
            broker_url = redis_server.url
        stack = Stack(sync_url(server_url), broker_url, postmaster_pid(server_url),
                      redis_pid(broker_url), throwaway)
        try:
            yield stack
        finally:
            with contextlib.suppress(psycopg2.Error):
                stack.drop_databases()
