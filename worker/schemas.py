"""The commands' payloads and results, with the contract's field rules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    PrivateAttr,
    SecretStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from worker.errors import Invalid
from worker.security import is_password_hash, printable


def timestamp(moment: datetime) -> str:
    """A moment as every output of this project writes it: ISO 8601 in UTC, ending in `Z`
    (as pydantic writes the results' `created_at`)."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _storable_text(value: str) -> str:
    # PostgreSQL text cannot hold NUL, nor the driver encode an unpaired surrogate (JSON's
    # "\ud800" reads as one): reject both here rather than fail in the driver.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must not contain unpaired surrogates") from None
    return value


def _password_rules(value: SecretStr) -> SecretStr:
    secret = value.get_secret_value()
    if not 8 <= len(secret) <= 128:
        raise ValueError("must be 8 to 128 characters")
    _storable_text(secret)
    return value


Storable = AfterValidator(_storable_text)
Username = Annotated[str, StringConstraints(min_length=1, max_length=50), Storable]
Email = Annotated[EmailStr, StringConstraints(max_length=100), Storable]
Password = Annotated[SecretStr, AfterValidator(_password_rules)]
Title = Annotated[str, StringConstraints(min_length=1, max_length=200), Storable]
Content = Annotated[str, StringConstraints(max_length=1_000_000), Storable]
TagName = Annotated[str, StringConstraints(min_length=1, max_length=50), Storable]
CommandId = Annotated[str, StringConstraints(min_length=1, max_length=128), Storable]
EntityId = Annotated[int, Field(ge=1, le=2**31 - 1)]
Version = Annotated[int, Field(ge=1, le=2**31 - 1)]
MAX_TAGS_PER_POST = 100
ModelT = TypeVar("ModelT", bound=BaseModel)


class Payload(BaseModel):
    """Base of command data: strict JSON types, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# The validation-context key under which a replay passes the password hash a dead letter
# kept. Only code in this process sets a validation context: no message can.
KEPT_PASSWORD_HASH = "kept_password_hash"  # noqa: S105 - a dictionary key, not a password


def _kept_hash(info: ValidationInfo) -> str | None:
    kept = info.context.get(KEPT_PASSWORD_HASH) if isinstance(info.context, dict) else None
    if kept is not None and not is_password_hash(kept):
        raise ValueError("the kept password hash is not an argon2id hash")
    return kept


class PasswordHolder(Payload):
    """User data with a password, and the argon2id hash that stands for it once hashed.

    The hash is a private attribute, not a field: `password_hash` in a message's data is an
    unknown field like any other (`invalid`). It is set in this process only: by
    `with_password_hash` after hashing, or from a dead letter's kept hash at replay.
    """

    password: Password | None = None
    _password_hash: str | None = PrivateAttr(default=None)

    @property
    def password_hash(self) -> str | None:
        """The argon2id hash to store (None: the password is not changed)."""
        return self._password_hash

    def with_password_hash(self, password_hash: str) -> Self:
        """A copy whose password is replaced by its hash (what worker/writes.py stores)."""
        hashed = self.model_copy(update={"password": None})
        hashed._password_hash = password_hash
        return hashed

    def _take_kept_hash(self, info: ValidationInfo) -> bool:
        """Take a replay's kept hash from the validation context; whether there was one."""
        kept = _kept_hash(info)
        if kept is None:
            return False
        if self.password is not None:
            raise ValueError("a replay with a kept password hash carries no password")
        self._password_hash = kept
        return True


class UserCreate(PasswordHolder):
    """`users.create` data."""

    username: Username
    email: Email
    is_active: bool = True

    @model_validator(mode="after")
    def _needs_a_password(self, info: ValidationInfo) -> Self:
        if not self._take_kept_hash(info) and self.password is None:
            raise ValueError("password is required")
        return self


class _PartialUpdate(Payload):
    # Fields that may be omitted but, when given, may not be null.
    _not_null: ClassVar[frozenset[str]] = frozenset()

    def _check_changes(self, changes_otherwise: bool = False) -> None:
        if not self.model_fields_set and not changes_otherwise:
            raise ValueError("data must name at least one field to change")
        for name in sorted(self.model_fields_set & self._not_null):
            if getattr(self, name) is None:
                raise ValueError(f"{name} may not be null")


class UserUpdate(PasswordHolder, _PartialUpdate):
    """`users.update` data: only the fields given change."""

    _not_null = frozenset({"username", "email", "is_active", "password"})

    username: Username | None = None
    email: Email | None = None
    is_active: bool | None = None

    @model_validator(mode="after")
    def _changes_something(self, info: ValidationInfo) -> Self:
        # A replayed password change: its kept hash is the change.
        self._check_changes(changes_otherwise=self._take_kept_hash(info))
        return self


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

    @model_validator(mode="after")
    def _changes_something(self) -> Self:
        self._check_changes()
        return self


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


# email-validator's reasons quote parts of the address (the characters refused, a domain
# label in an IDNA error): only the verdict is kept.
_EMAIL_VERDICT = "value is not a valid email address"
# Field names in an error come from the input for unknown fields: each is cut and escaped.
LOCATION_PART_LIMIT = 64
MAX_ERRORS_DESCRIBED = 10


def describe_validation_error(error: ValidationError, where: str = "") -> str:
    """A one-line summary of `error` that names fields and rules but never echoes input."""
    parts = []
    items = error.errors(include_input=False, include_url=False, include_context=False)
    for item in items[:MAX_ERRORS_DESCRIBED]:
        location = ".".join(printable(part, LOCATION_PART_LIMIT)
                            for part in (where, *item["loc"]) if part != "")
        message = item["msg"].removeprefix("Value error, ")
        if message.startswith(_EMAIL_VERDICT):
            message = _EMAIL_VERDICT
        parts.append(f"{location or 'value'}: {message}")
    if len(items) > MAX_ERRORS_DESCRIBED:
        parts.append(f"and {len(items) - MAX_ERRORS_DESCRIBED} more")
    return "; ".join(parts)


def parse(model: type[ModelT], value: object, where: str = "",
          context: dict[str, Any] | None = None) -> ModelT:
    """`value` validated as `model`, or `Invalid` naming what is wrong (never the input).

    `context` is for this process's own use (a replay's KEPT_PASSWORD_HASH), never input.
    """
    if not isinstance(value, dict):
        raise Invalid(f"{where or 'value'}: must be an object")
    try:
        return model.model_validate(value, context=context)
    except ValidationError as error:
        raise Invalid(describe_validation_error(error, where)) from None
