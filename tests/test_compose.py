"""Compose file and Dockerfile: start order, durable Redis, guarded Flower, commands that exist."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import socket
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
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import yaml  # type: ignore[import-untyped]  # pyyaml ships no types; no stubs in the lock
from alembic.config import Config
from alembic.script import ScriptDirectory
from celery import Celery
from sqlalchemy.engine import make_url

from tests.conftest import ROOT, start_worker, stop_worker

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
    assert argv(worker["command"]) == [
        "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO", "-E",
    ]


def test_the_health_checks_ask_the_right_question() -> None:
    postgres = argv(SERVICES["postgres"]["healthcheck"]["test"])
    redis = argv(SERVICES["redis"]["healthcheck"]["test"])
    worker = argv(resolved(SERVICES["worker"]["healthcheck"]["test"]))

    assert postgres[0] == "pg_isready" and "127.0.0.1" in postgres  # TCP: not the init server
    assert redis == ["redis-cli", "ping"]
    assert worker[:5] == ["celery", "-A", "worker.celery_app", "inspect", "ping"]
    assert worker[worker.index("-d") + 1] == "celery@$HOSTNAME"  # the default node name


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
    for name, target in [("postgres", "/var/lib/postgresql/data"), ("redis", "/data")]:
        (volume,) = SERVICES[name]["volumes"]
        source, _, mounted = volume.partition(":")
        assert mounted == target
        assert source in COMPOSE["volumes"]
    assert SERVICES["postgres"]["image"] == "postgres:16"
    assert SERVICES["redis"]["image"] == "redis:7"


def test_only_flower_publishes_a_port_and_only_on_localhost() -> None:
    published = {name: service["ports"] for name, service in SERVICES.items() if "ports" in service}
    assert published == {"flower": ["127.0.0.1:5555:5555"]}


def test_flower_requires_basic_auth_and_compose_refuses_to_start_without_it() -> None:
    command = SERVICES["flower"]["command"]

    with pytest.raises(MissingVariable):
        resolved(command, {})
    with pytest.raises(MissingVariable):
        resolved(command, {"FLOWER_BASIC_AUTH": ""})
    arguments = argv(resolved(command, FLOWER_AUTH))
    assert arguments[:4] == ["celery", "-A", "worker.celery_app", "flower"]
    assert "--basic-auth=operator:flower-pass-123" in arguments
    assert "--address=0.0.0.0" in arguments and "--port=5555" in arguments


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


def test_every_celery_command_names_this_projects_celery_app() -> None:
    celery_commands = [(where, args) for where, args in every_command() if args[0] == "celery"]
    assert len(celery_commands) == 3  # worker, its healthcheck, flower

    for where, args in celery_commands:
        module = import_module(args[args.index("-A") + 1])
        assert isinstance(module.app, Celery), where
        module.app.loader.import_default_modules()
        for entity in ("users", "posts", "tags"):
            for action in ("create", "update", "delete"):
                assert f"{entity}.{action}" in module.app.tasks, where


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


@pytest.mark.parametrize("subcommand", ["worker", "inspect", "flower"])
def test_every_celery_subcommand_compose_uses_is_installed(subcommand: str) -> None:
    used = {args[3] for _, args in every_command() if args[0] == "celery"}
    assert subcommand in used

    done = celery_subcommand_help(subcommand)

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Usage: celery {subcommand}" in done.stdout


def test_alembic_upgrade_head_has_one_head_to_reach() -> None:
    config = Config(str(ROOT / "alembic.ini"))

    assert len(ScriptDirectory.from_config(config).get_heads()) == 1


def test_the_programs_compose_runs_come_with_the_runtime_dependencies() -> None:
    # The image is built with --no-dev: a program from the dev group would be missing.
    runtime = {requirement_name(item) for item in PYPROJECT["project"]["dependencies"]}
    providers = {"celery": "celery", "alembic": "alembic", "python": None}

    for where, args in every_command():
        assert args[0] in providers, f"{where}: {args[0]} is not a program the image has"
        if providers[args[0]] is not None:
            assert providers[args[0]] in runtime, where
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
    assert "uv sync --locked --no-dev" in runs
    assert users and users[-1] not in ("root", "0")
    assert any(instruction == "COPY" and "astral-sh/uv" in arguments
               for instruction, arguments in instructions)
    for name in APP_SERVICES:
        assert SERVICES[name]["build"] == "."


def test_the_build_context_leaves_out_environments_data_and_secrets() -> None:
    for path in (".env", ".venv", ".data", ".git", "worker/__pycache__"):
        assert ignored(path), path


# --- the worker healthcheck against a real worker ---------------------------------------------


@dataclass(frozen=True)
class HealthcheckTarget:
    """A running worker named as in the container, and a way to run the compose healthcheck."""

    hostname: str
    broker: redis.Redis
    env: dict[str, str]

    def check(self, node_host: str, timeout: int = 10) -> subprocess.CompletedProcess[str]:
        """Run the worker service's healthcheck with HOSTNAME=`node_host`."""
        command = " ".join(argv(resolved(SERVICES["worker"]["healthcheck"]["test"])))
        return subprocess.run(["sh", "-c", command.replace("--timeout 10", f"--timeout {timeout}")],
                              cwd=ROOT, env={**self.env, "HOSTNAME": node_host},
                              capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def healthcheck_target(database_url: str, broker_url: str,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[HealthcheckTarget]:
    """A Celery worker called celery@<hostname>, on a Redis database of its own."""
    # Database 15: nothing this worker or the healthcheck leaves in Redis reaches other tests.
    isolated = urlunsplit(urlsplit(broker_url)._replace(path="/15"))
    client = redis.Redis.from_url(isolated)
    client.flushdb()
    hostname = socket.gethostname()
    log = tmp_path_factory.mktemp("healthcheck") / "worker.log"
    worker = start_worker(database_url, isolated, log, "-n", f"celery@{hostname}")  # -n: last wins
    try:
        yield HealthcheckTarget(hostname, client, {
            **os.environ, "DATABASE_URL": database_url, "BROKER_URL": isolated})
    finally:
        stop_worker(worker)
        client.flushdb()


def healthy_within(
    target: HealthcheckTarget, seconds: float = 60
) -> subprocess.CompletedProcess[str]:
    """The healthcheck's result, retried as Compose does (remote control starts after consuming)."""
    deadline = time.monotonic() + seconds
    done = target.check(target.hostname)
    while done.returncode != 0 and time.monotonic() < deadline:
        time.sleep(1)
        done = target.check(target.hostname)
    return done


@pytest.mark.integration
def test_the_worker_healthcheck_passes_for_the_running_worker_and_fails_for_another_name(
    healthcheck_target: HealthcheckTarget,
) -> None:
    healthy = healthy_within(healthcheck_target)
    missing = healthcheck_target.check("no-such-host", timeout=2)

    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert f"celery@{healthcheck_target.hostname}: OK" in healthy.stdout
    assert "pong" in healthy.stdout
    assert missing.returncode != 0


@pytest.mark.integration
def test_the_worker_healthcheck_leaves_no_reply_unacknowledged_in_redis(
    healthcheck_target: HealthcheckTarget,
) -> None:
    healthy = healthy_within(healthcheck_target)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr

    left = [raw for raw in healthcheck_target.broker.hvals("unacked") if b"pidbox" in raw]

    assert left == []
