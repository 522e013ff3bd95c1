"""The commands' payloads and results, with the contract's field rules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    model_validator,
)

from worker.errors import Invalid
from worker.security import is_password_hash


def timestamp(moment: datetime) -> str:
    """A moment as every output of this project writes it: ISO 8601 in UTC, ending in `Z`
    (as pydantic writes the results' `created_at`)."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; reject it here rather than fail in the driver.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _password_rules(value: SecretStr) -> SecretStr:
    secret = value.get_secret_value()
    if not 8 <= len(secret) <= 128:
        raise ValueError("must be 8 to 128 characters")
    _no_nul(secret)
    return value


Username = Annotated[str, StringConstraints(min_length=1, max_length=50), AfterValidator(_no_nul)]
Email = Annotated[EmailStr, StringConstraints(max_length=100), AfterValidator(_no_nul)]
Password = Annotated[SecretStr, AfterValidator(_password_rules)]
PasswordHash = Annotated[str, AfterValidator(lambda v: _require_hash(v))]
Title = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_no_nul)]
Content = Annotated[str, StringConstraints(max_length=1_000_000), AfterValidator(_no_nul)]
TagName = Annotated[str, StringConstraints(min_length=1, max_length=50), AfterValidator(_no_nul)]
CommandId = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_no_nul)]
EntityId = Annotated[int, Field(ge=1, le=2**31 - 1)]
Version = Annotated[int, Field(ge=1, le=2**31 - 1)]
MAX_TAGS_PER_POST = 100
ModelT = TypeVar("ModelT", bound=BaseModel)


def _require_hash(value: str) -> str:
    if not is_password_hash(value):
        raise ValueError("must be an argon2id hash")
    return value


class Payload(BaseModel):
    """Base of command data: strict JSON types, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _PasswordOrHash(Payload):
    # `password_hash` exists so that a replayed dead letter carries only the hash it kept.
    password: Password | None = None
    password_hash: PasswordHash | None = None

    @model_validator(mode="after")
    def _one_secret_at_most(self) -> _PasswordOrHash:
        if self.password is not None and self.password_hash is not None:
            raise ValueError("give password or password_hash, not both")
        return self


class UserCreate(_PasswordOrHash):
    """`users.create` data."""

    username: Username
    email: Email
    is_active: bool = True

    @model_validator(mode="after")
    def _needs_a_secret(self) -> UserCreate:
        if self.password is None and self.password_hash is None:
            raise ValueError("password is required")
        return self


class _PartialUpdate(Payload):
    # Fields that may be omitted but, when given, may not be null.
    _not_null: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _changes_something(self) -> _PartialUpdate:
        if not self.model_fields_set:
            raise ValueError("data must name at least one field to change")
        for name in sorted(self.model_fields_set & self._not_null):
            if getattr(self, name) is None:
                raise ValueError(f"{name} may not be null")
        return self


class UserUpdate(_PasswordOrHash, _PartialUpdate):
    """`users.update` data: only the fields given change."""

    _not_null = frozenset({"username", "email", "is_active", "password", "password_hash"})

    username: Username | None = None
    email: Email | None = None
    is_active: bool | None = None


class PostCreate(Payload):
    """`posts.create` data; tags named but missing are created."""

    title: Title
    content: Content | None = None
    author_id: EntityId
    tags: Annotated[list[TagName], Field(max_length=MAX_TAGS_PER_POST)] = []


class PostUpdate(_PartialUpdate):
    """`posts.update` data; `tags` replaces the set."""

    _not_null = frozenset({"title", "tags"})

    title: Title | None = None
    content: Content | None = None
    tags: Annotated[list[TagName], Field(max_length=MAX_TAGS_PER_POST)] | None = None


class TagCreate(Payload):
    """`tags.create` data."""

    name: TagName


class TagUpdate(Payload):
    """`tags.update` data."""

    name: TagName


class CreateCommand(Payload):
    """Keyword arguments of a `*.create` command."""

    data: dict[str, Any]
    command_id: CommandId | None = None


class UpdateCommand(Payload):
    """Keyword arguments of a `*.update` command."""

    id: EntityId
    data: dict[str, Any]
    command_id: CommandId | None = None
    expected_version: Version | None = None


class DeleteCommand(Payload):
    """Keyword arguments of a `*.delete` command."""

    id: EntityId
    command_id: CommandId | None = None
    expected_version: Version | None = None


class Record(BaseModel):
    """Base of what a result's `data` holds: the stored record, never a secret."""

    model_config = ConfigDict(from_attributes=True, frozen=True)


class UserRecord(Record):
    """A user as stored, without its password hash."""

    id: int
    username: str
    email: str
    is_active: bool
    created_at: datetime
    updated_at: datetime
    version: int


class TagRecord(Record):
    """A tag as stored."""

    id: int
    name: str
    version: int


class PostRecord(Record):
    """A post as stored, with its tag names."""

    id: int
    title: str
    content: str | None
    author_id: int
    created_at: datetime
    version: int
    tags: list[str]


class PostDetail(PostRecord):
    """A post with its author, for readers."""

    author: UserRecord


class CommandResult(BaseModel):
    """What an applied (or duplicate) command returns."""

    command_id: str
    outcome: Literal["applied", "duplicate"]
    entity: Literal["user", "post", "tag"]
    id: int
    data: dict[str, Any]


def describe_validation_error(error: ValidationError, where: str = "") -> str:
    """A one-line summary of `error` that names fields and rules but never echoes input."""
    parts = []
    for item in error.errors(include_input=False, include_url=False, include_context=False):
        location = ".".join(str(part) for part in (where, *item["loc"]) if part != "")
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{location or 'value'}: {message}")
    return "; ".join(parts)


def parse(model: type[ModelT], value: object, where: str = "") -> ModelT:
    """`value` validated as `model`, or `Invalid` naming what is wrong (never the input)."""
    if not isinstance(value, dict):
        raise Invalid(f"{where or 'value'}: must be an object")
    try:
        return model.model_validate(value)
    except ValidationError as error:
        raise Invalid(describe_validation_error(error, where)) from None
