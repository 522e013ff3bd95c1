"""Redaction by rule: no secret-like key's value is shown, whatever its spelling or depth."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.security import (
    MAX_DEPTH,
    NESTED_TOO_DEEPLY,
    REDACTED,
    is_secret_key,
    printable,
    redact,
    redact_args,
    safe_repr,
)

SECRET = "hunter2-very-secret"


@pytest.mark.parametrize("name", [
    "password", "Password", "PASSWORD", "pass_word", "pass-word", "pass word", "user_password",
    "password_hash", "hashed_password", "new-Password", "passwd", "passphrase", "pwd",
    "client_secret", "SECRET", "token", "access_token", "X-Auth-Token", "apikey", "api_key",
    "API-Key", "credentials", "private_key", "privateKey", "Authorization",
    # Fullwidth letters and the long s fold to the plain ones.
    "\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44", "pa\u017fsword",
])
def test_a_key_named_like_a_secret_is_secret_in_every_spelling(name: str) -> None:
    assert is_secret_key(name)
    assert redact({name: SECRET}) == {name: REDACTED}


@pytest.mark.parametrize("name", ["author_id", "username", "email", "title", "content",
                                  "tags", "id", "command_id", "data", "is_active", "name"])
def test_the_contract_s_own_fields_are_not_secret(name: str) -> None:
    assert not is_secret_key(name)
    assert redact({name: "shown"}) == {name: "shown"}


def test_a_secret_is_redacted_at_the_top_under_any_key_and_in_lists() -> None:
    value = {"password": SECRET, "data": {"profile": {"Password": SECRET}},
             "items": [{"pwd": SECRET}, [{"secret": {"nested": SECRET}}]], "keep": "me"}
    shown = redact(value)
    assert SECRET not in json.dumps(shown)
    assert shown["keep"] == "me"
    assert shown["items"][1][0]["secret"] == REDACTED


def test_the_input_is_left_unchanged() -> None:
    value = {"data": {"password": SECRET}}
    redact(value)
    assert value == {"data": {"password": SECRET}}


def test_tuples_stay_tuples_and_lists_lists() -> None:
    assert redact(("a", ["b", {"token": 1}])) == ("a", ["b", {"token": REDACTED}])


def test_keys_that_are_not_strings_are_tested_as_text() -> None:
    shown = redact({1: "one", ("password",): SECRET, None: "none", b"api_key": SECRET})
    assert shown == {1: "one", ("password",): REDACTED, None: "none", b"api_key": REDACTED}


@pytest.mark.parametrize("text", [
    json.dumps({"password": SECRET}),
    repr({"password": SECRET}),
    f"password={SECRET}",
    f"Password: {SECRET}",
    json.dumps(json.dumps({"user_password": SECRET})),
    f"[{{'pass_word': '{SECRET}'}}]",
])
def test_a_string_that_holds_a_secret_like_key_is_replaced_whole(text: str) -> None:
    assert redact({"data": text}) == {"data": REDACTED}
    assert redact([text]) == [REDACTED]


def test_prose_that_names_a_secret_without_giving_one_is_kept() -> None:
    assert redact({"content": "Choose a password reset at 10:30"}) == {
        "content": "Choose a password reset at 10:30"}


def test_a_key_that_holds_a_secret_is_replaced_too() -> None:
    shown = redact({f"password={SECRET}": 1, "ok": 2})
    assert SECRET not in repr(shown)
    assert shown["ok"] == 2


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 500, 900, 5000])
def test_any_depth_is_redacted_without_recursion_and_capped(depth: int) -> None:
    value: dict[str, Any] = {}
    inner = value
    for _ in range(depth):
        inner["k"] = {}
        inner = inner["k"]
    inner["password"] = SECRET
    shown = redact(value)
    text = json.dumps(shown)
    assert SECRET not in text
    assert NESTED_TOO_DEEPLY in text
    assert text.count('"k"') == MAX_DEPTH
    lists: list[Any] = [SECRET]
    for _ in range(depth):
        lists = [lists]
    assert SECRET not in repr(redact_args(lists))


def test_a_value_holding_itself_ends_at_the_depth_cap() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert NESTED_TOO_DEEPLY in json.dumps(redact(loop))


def test_positional_arguments_keep_no_string_not_under_a_key() -> None:
    shown = redact_args(["ada", "ada@example.com", SECRET, 7,
                         {"username": "ada", "password": SECRET}])
    assert shown == [REDACTED, REDACTED, REDACTED, 7, {"username": "ada", "password": REDACTED}]


def test_safe_repr_is_short_redacted_and_never_raises() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    assert SECRET not in safe_repr({"data": {"password": SECRET}})
    assert len(safe_repr({"content": "x" * 100_000}, limit=80)) <= 80
    assert isinstance(safe_repr(Broken()), str)
    assert SECRET not in safe_repr([SECRET], positional=True)


def test_printable_caps_escapes_and_redacts_what_it_echoes() -> None:
    assert printable("users.create") == "users.create"
    assert printable("a\x00b\ud800\n") == "a\\x00b\\ud800\\n"
    assert len(printable("x" * 10_000)) <= 203
    assert len(printable("\x00" * 10_000, 50)) <= 53
    assert printable(f"password={SECRET}") == REDACTED
