"""Every setting of the worker, read from the environment (and a `.env` file)."""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import BadConfiguration, NoServerError

__all__ = ["BadConfiguration", "NoServerError", "Settings", "broker_url", "database_url",
           "get_settings", "result_backend_url", "running_servers_file"]

# Any driver name is accepted (psycopg2 and asyncpg are substituted); the dialect is fixed.
POSTGRES_SCHEMES = ("postgres", "postgresql")
BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")
# Settings whose values may hold a password: a message about them never repeats the value.
SECRET_SETTINGS = ("database_url", "broker_url", "result_backend", "flower_basic_auth")


class Settings(BaseSettings):
    """Configuration for the worker, its CLI and Alembic; names match CONTRACT.md."""

    # An empty variable counts as unset, as in Compose (`FLOWER_BASIC_AUTH=` turns Flower off).
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", env_ignore_empty=True)

    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of PostgreSQL; unset: the embedded server"
    )
    broker_url: str | None = Field(
        default=None, description="Redis URL of the broker; unset: the embedded server"
    )
    result_backend: str | None = Field(
        default=None, description="Where task results go; unset: the broker's Redis"
    )
    commands_queue: str = Field(default="commands", min_length=1)
    broker_sentinel_master: str | None = Field(
        default=None, description="Sentinel master name, with a sentinel:// BROKER_URL"
    )

    db_pool_size: int = Field(default=5, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    db_pool_timeout: float = Field(default=30, gt=0)
    db_pool_recycle: int = Field(default=1800, ge=-1)
    db_prepared_statements: bool = Field(
        default=True,
        description="Prepare write statements once per connection (false behind PgBouncer's "
                    "transaction pooling, which cannot keep them)",
    )
    db_statement_timeout_ms: int = Field(default=30_000, ge=0)
    db_lock_timeout_ms: int = Field(default=10_000, ge=0)

    broker_visibility_timeout: int = Field(
        default=60,
        ge=1,
        description="Seconds before an unacknowledged command is delivered again",
    )

    # argon2id cost: OWASP's recommended minimum (19 MiB, 2 passes, 1 lane): one core per
    # hash, so worker processes, not threads inside a hash, use the machine's cores.
    password_hash_time_cost: int = Field(default=2, ge=1)
    password_hash_memory_kib: int = Field(default=19_456, ge=8)
    password_hash_parallelism: int = Field(default=1, ge=1)

    max_retries: int = Field(default=8, ge=0, description="Retries of a transient fault")
    max_deliveries: int = Field(
        default=5, ge=1, description="Deliveries of one message before it is a dead letter"
    )
    retry_backoff_max: float = Field(default=30, gt=0)
    result_expires: int = Field(default=86_400, ge=60)
    max_payload_bytes: int = Field(default=1_048_576, ge=1024)

    flower_basic_auth: str | None = Field(default=None, repr=False)
    flower_address: str = "127.0.0.1"
    flower_port: int = 5555

    data_dir: str = Field(default=".data", description="Where `run` keeps embedded servers")

    @field_validator("database_url")
    @classmethod
    def _is_postgresql(cls, url: str | None) -> str | None:
        if url is not None and _scheme(url).split("+")[0] not in POSTGRES_SCHEMES:
            raise ValueError("not a PostgreSQL URL (postgresql://user:password@host:5432/name)")
        return url

    @field_validator("broker_url")
    @classmethod
    def _is_redis(cls, url: str | None) -> str | None:
        if url is not None and _scheme(url) not in BROKER_SCHEMES:
            raise ValueError("not a Redis URL (redis://host:6379/0, rediss://, sentinel://)")
        return url

    @field_validator("flower_basic_auth")
    @classmethod
    def _is_user_and_password(cls, value: str | None) -> str | None:
        # Flower takes a comma-separated list; an entry without both halves locks nobody out.
        if value is not None and not all(
                user and password for user, _, password in
                (entry.partition(":") for entry in value.split(","))):
            raise ValueError("not user:password (or several, separated by commas)")
        return value


def _scheme(url: str) -> str:
    """The scheme of `url`, lower case ('' when it has none)."""
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:
        return ""


def describe(error: ValidationError) -> str:
    """A settings validation error in one line: each setting by its variable name."""
    problems = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        message = str(item["msg"]).removeprefix("Value error, ")
        if field and field not in SECRET_SETTINGS and "input" in item:
            message += f" (got {item['input']!r})"
        problems.append(f"{field.upper()}: {message}" if field else message)
    return "bad configuration: " + "; ".join(problems)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; `BadConfiguration` says, in one line, what is wrong."""
    try:
        return Settings()
    except ValidationError as error:
        raise BadConfiguration(describe(error)) from None


def running_servers_file(settings: Settings) -> str:
    """Where `python -m worker run` records the URLs of its embedded servers."""
    import os

    return os.path.join(settings.data_dir, "servers.json")


def _embedded_url(settings: Settings, key: str) -> str:
    import json
    import os

    path = running_servers_file(settings)
    try:
        with open(path, encoding="utf-8") as handle:
            recorded = json.load(handle)
        pid = int(recorded["pid"])
        os.kill(pid, 0)
        return str(recorded[key])
    except (OSError, ValueError, KeyError) as error:
        raise NoServerError(
            f"{key.upper()} is not set and no `python -m worker run` is running in "
            f"{os.path.abspath(settings.data_dir)}: set {key.upper()} "
            "or start `python -m worker run`"
        ) from error


def database_url(settings: Settings | None = None) -> str:
    """The PostgreSQL URL in force: DATABASE_URL, else the running embedded server's."""
    settings = settings or get_settings()
    return settings.database_url or _embedded_url(settings, "database_url")


def broker_url(settings: Settings | None = None) -> str:
    """The Redis URL in force: BROKER_URL, else the running embedded server's."""
    settings = settings or get_settings()
    return settings.broker_url or _embedded_url(settings, "broker_url")


def result_backend_url(settings: Settings | None = None) -> str:
    """Where results go: RESULT_BACKEND, else the broker's Redis."""
    settings = settings or get_settings()
    return settings.result_backend or broker_url(settings)
