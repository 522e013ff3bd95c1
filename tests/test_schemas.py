"""The command payloads: the contract's field rules, and errors that never echo input."""

from __future__ import annotations

from typing import Any

import pytest
from argon2 import PasswordHasher

from worker.errors import Invalid
from worker.schemas import (
    KEPT_PASSWORD_HASH,
    CreateCommand,
    DeleteCommand,
    PostCreate,
    PostUpdate,
    TagCreate,
    UpdateCommand,
    UserCreate,
    UserUpdate,
    parse,
)

GOOD_USER = {"username": "alice", "email": "alice@example.com", "password": "correct horse"}


def rejected(model: type[Any], value: object) -> str:
    with pytest.raises(Invalid) as caught:
        parse(model, value, "data")
    message = str(caught.value)
    assert message.startswith("invalid: ")
    return message


def test_a_valid_user_is_accepted_and_its_password_is_hidden_in_repr() -> None:
    user = parse(UserCreate, GOOD_USER)
    assert user.username == "alice"
    assert user.is_active is True
    assert "correct horse" not in repr(user)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"username": ""}, "username"),
        ({"username": "u" * 51}, "username"),
        ({"email": "not-an-email"}, "email"),
        ({"email": "a" * 95 + "@x.com"}, "email"),
        ({"password": "short"}, "password"),
        ({"password": "p" * 129}, "password"),
        ({"password": 12345678}, "password"),
        ({"is_active": "yes"}, "is_active"),
        ({"username": "nul\x00byte"}, "username"),
        ({"role": "admin"}, "role"),
    ],
)
def test_a_user_breaking_a_field_rule_is_invalid_and_names_the_field(
    change: dict[str, Any], field: str
) -> None:
    message = rejected(UserCreate, {**GOOD_USER, **change})
    assert f"data.{field}" in message


def test_an_error_message_never_contains_the_password() -> None:
    secret = "hunter2-but-longer-than-128" * 10
    message = rejected(UserCreate, {**GOOD_USER, "password": secret, "email": "bad"})
    assert secret not in message
    assert "hunter2" not in message


def test_a_user_needs_a_password() -> None:
    assert "password is required" in rejected(UserCreate, {"username": "a", "email": "a@b.co"})


HASHED = "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"


@pytest.mark.parametrize("password_hash", [
    HASHED,
    # Hashes of "" and "a" with cheap parameters, junk that would lock the account out, NUL.
    PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(""),
    PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("a"),
    "$argon2id$junk",
    "$argon2id$\x00",
    None,
])
def test_password_hash_is_not_a_producer_field(password_hash: object) -> None:
    message = rejected(UserCreate, {**GOOD_USER, "password_hash": password_hash})
    assert "data.password_hash: Extra inputs are not permitted" in message
    assert "data.password_hash" in rejected(UserCreate, {"username": "a", "email": "a@b.co",
                                                         "password_hash": password_hash})
    assert "data.password_hash" in rejected(UserUpdate, {"password_hash": password_hash})


def test_a_kept_hash_stands_in_for_the_password_only_from_this_process() -> None:
    context = {KEPT_PASSWORD_HASH: HASHED}
    user = parse(UserCreate, {"username": "a", "email": "a@b.co"}, "data", context)
    assert user.password_hash == HASHED and user.password is None
    # A password change alone, replayed: the kept hash is the change.
    assert parse(UserUpdate, {}, "data", context).password_hash == HASHED
    with pytest.raises(Invalid, match="carries no password"):
        parse(UserCreate, GOOD_USER, "data", context)
    with pytest.raises(Invalid, match="not an argon2id hash"):
        parse(UserCreate, {"username": "a", "email": "a@b.co"}, "data",
              {KEPT_PASSWORD_HASH: "plain"})
    assert parse(UserCreate, GOOD_USER).password_hash is None


def test_an_update_must_change_something_and_may_not_null_a_required_field() -> None:
    assert "at least one field" in rejected(UserUpdate, {})
    assert "username may not be null" in rejected(UserUpdate, {"username": None})
    assert "title may not be null" in rejected(PostUpdate, {"title": None})
    assert parse(PostUpdate, {"content": None}).model_fields_set == {"content"}


def test_post_rules() -> None:
    post = parse(PostCreate, {"title": "t", "author_id": 1, "tags": ["a", "b"]})
    assert post.tags == ["a", "b"]
    assert "title" in rejected(PostCreate, {"title": "", "author_id": 1})
    assert "title" in rejected(PostCreate, {"title": "x" * 201, "author_id": 1})
    assert "author_id" in rejected(PostCreate, {"title": "t", "author_id": "1"})
    assert "tags.0" in rejected(PostCreate, {"title": "t", "author_id": 1, "tags": [""]})
    assert "tags" in rejected(PostCreate, {"title": "t", "author_id": 1, "tags": ["t"] * 101})


def test_tag_rules() -> None:
    assert parse(TagCreate, {"name": "🐍 python"}).name == "🐍 python"
    assert "name" in rejected(TagCreate, {"name": "x" * 51})


@pytest.mark.parametrize(
    ("model", "kwargs", "field"),
    [
        (CreateCommand, {"data": {}, "command_id": ""}, "command_id"),
        (CreateCommand, {"data": {}, "command_id": "k" * 129}, "command_id"),
        (CreateCommand, {"data": {}, "extra": 1}, "extra"),
        (CreateCommand, {}, "data"),
        (UpdateCommand, {"id": "7", "data": {}}, "id"),
        (UpdateCommand, {"id": 0, "data": {}}, "id"),
        (UpdateCommand, {"id": 1, "data": {}, "expected_version": 0}, "expected_version"),
        (DeleteCommand, {"id": 2**40}, "id"),
        (DeleteCommand, {"id": 1, "data": {}}, "data"),
    ],
)
def test_keyword_arguments_are_checked_too(model: type[Any], kwargs: object, field: str) -> None:
    with pytest.raises(Invalid, match=field):
        parse(model, kwargs)


def test_an_email_error_names_the_rule_but_not_the_address() -> None:
    # email-validator quotes a domain label in its IDNA errors.
    message = rejected(UserCreate, {**GOOD_USER, "email": "x@\u0661\u0662hunter2.com"})
    assert "data.email: value is not a valid email address" in message
    assert "hunter2" not in message


def test_an_unknown_field_s_name_is_echoed_cut_and_escaped() -> None:
    message = rejected(TagCreate, {"name": "t", "evil\x00\n" + "x" * 500: 1})
    assert "\x00" not in message and "\n" not in message
    assert "evil\\x00\\n" in message
    assert len(message) < 200


def test_a_field_name_that_carries_a_secret_is_not_echoed() -> None:
    message = rejected(TagCreate, {"name": "t", "password=hunter2": 1})
    assert "hunter2" not in message


@pytest.mark.parametrize(("model", "value", "field"), [
    (UserCreate, {**GOOD_USER, "username": "abcdefgh\ud800"}, "username"),
    (UserCreate, {**GOOD_USER, "password": "abcdefgh\ud800"}, "password"),
    (PostCreate, {"title": "t", "author_id": 1, "content": "\udfff"}, "content"),
    (CreateCommand, {"data": {}, "command_id": "k\ud800"}, "command_id"),
])
def test_text_with_an_unpaired_surrogate_is_invalid_not_a_driver_crash(
    model: type[Any], value: dict[str, Any], field: str
) -> None:
    assert f"data.{field}" in rejected(model, value)
