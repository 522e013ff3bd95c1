"""Hostile input: a corpus of every kind of bad message, through one real worker node.

The corpus holds what an attacker-minded tester sent the old consumers (bodies that stopped
them, values that looped them, passwords they leaked) and variants of each. Every case
declares its one outcome: applied, revoked, or exactly one dead letter with a given reason,
and whether a result (SUCCESS, FAILURE, REVOKED) must be stored under its task id.

The whole corpus is published at once (one MULTI) to a worker node of this module's own
(`celery worker -E --loglevel DEBUG`) on the suite's servers, in a Redis database and a
PostgreSQL database of its own, while a Celery event receiver and a raw subscriber record
everything published. Then, for the corpus as a whole: every message ended in exactly its
outcome, nothing is left in Redis, the node applies a fresh command before and after a
restart, and no secret of the corpus can be read anywhere (tables, Redis, events, the log,
the dead-letters command line), as itself, JSON-, repr- or URL-escaped, or base64-encoded.
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import itertools
import json
import lzma
import os
import pickle
import re
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import redis
from alembic.config import Config
from celery import Celery
from sqlalchemy import create_engine, text

from alembic import command as alembic_command
from tests.conftest import (
    ROOT,
    TEST_ENV,
    WorkerProcess,
    _fresh_database,
    start_worker,
    stop_worker,
)
from worker.broker import PRIORITY_SEPARATOR, QueueKeys, stored
from worker.protocol import encode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

QUEUE = "commands"
KEYS = QueueKeys(QUEUE)
MAX_PAYLOAD = 1 << 20
MAX_DELIVERIES = 5
JSON_TYPE = "application/json"
APPLIED, REVOKED = "applied", "revoked"
SUCCESS, FAILURE = "SUCCESS", "FAILURE"
INVALID, UNDECODABLE, UNKNOWN = "invalid", "undecodable", "unknown_command"
CONFLICT, NOT_FOUND, EXHAUSTED = "conflict", "not_found", "retries_exhausted"
#: "the result follows from the outcome and the task id" (see Corpus.add)
AUTO = "auto"
#: "password" in fullwidth letters (NFKC folds them to plain ones).
FULLWIDTH_PASSWORD = "\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44"
LOG_RECORD = re.compile(r"^\[\d{4}-\d\d-\d\d [^]]*: [A-Z]+/", re.MULTILINE)
TABLES = ("users", "posts", "tags", "post_tags", "command_ledger", "dead_letters")


# --- building messages ----------------------------------------------------------------------

def envelope(token: str, task: str = "tags.create", kwargs: Any = None, *,
             args: Any = None, embed: Any = None, task_id: Any = AUTO) -> dict[str, Any]:
    """A message as kombu writes it (`send_task`), its task id `<token>-id` unless given.

    A top-level "case" key carries the token: decoders ignore it, dead letters keep it.
    """
    kwargs = {"data": {"name": token}} if kwargs is None else kwargs
    message = json.loads(encode(task, kwargs, queue=QUEUE, task_id=f"{token}-id",
                                args=args, embed=embed))
    if task_id is not AUTO:
        message["headers"]["id"] = message["headers"]["root_id"] = task_id
    return {"case": token, **message}


def dump(message: Any, *, compact: bool = False, raw: dict[str, str] | None = None) -> bytes:
    """The queue item: JSON as kombu writes it; each `"@NAME@"` string replaced by raw text."""
    text_ = json.dumps(message, separators=(",", ":") if compact else None)
    for name, replacement in (raw or {}).items():
        text_ = text_.replace(f'"@{name}@"', replacement)
    return text_.encode()


def with_body(message: dict[str, Any], body: Any, encoding: Any = "utf-8") -> dict[str, Any]:
    """`message` with `body` as is (a producer's text, or any JSON value) in `encoding`."""
    message["body"] = body
    message["properties"]["body_encoding"] = encoding
    return message


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def compressed(message: dict[str, Any], body: bytes, method: str, name: str) -> dict[str, Any]:
    message["body"] = b64(method_compress(body, method))
    message["headers"]["compression"] = name
    return message


def method_compress(data: bytes, method: str) -> bytes:
    if method == "zlib":
        return zlib.compress(data, 9)
    if method == "bz2":
        return bz2.compress(data, 9)
    return lzma.compress(data, preset=0)


def nested(depth: int, inner: str = '"x"', opener: str = '{"k": ', closer: str = "}") -> str:
    return opener * depth + inner + closer * depth


def msgpack_map(key: str, value: str) -> bytes:
    """{key: value} in MessagePack (fixmap of one, str8 strings), without the library."""
    def string(text_: str) -> bytes:
        data = text_.encode()
        return bytes([0xD9, len(data)]) + data
    return bytes([0x81]) + string(key) + string(value)


def user(token: str, password: str, **more: Any) -> dict[str, Any]:
    return {"username": token, "email": f"{token}@example.com", "password": password, **more}


# --- the corpus -----------------------------------------------------------------------------

@dataclass
class Case:
    """One kind of message, its bytes (one item, or identical copies) and its one outcome."""

    name: str
    token: str
    raws: list[bytes]
    outcome: str
    #: SUCCESS, FAILURE, "REVOKED" or None: what must be stored under `task_id`.
    result: str | None
    task_id: str | None
    #: The idempotency key: in the ledger when applied, the dead letter's command_id else.
    key: str | None
    #: Priority sub-list suffix ("" for the queue's own list).
    target: str = ""
    #: Deliveries already counted for the item (as if workers had died on it).
    preset: int = 0
    #: The raw text its dead letter keeps, for a JSON item with no room for the token.
    evidence: str | None = None
    #: A bug found and not fixed yet: checked by a strict xfail test of its own.
    known: str = ""

    @property
    def rejected(self) -> bool:
        return self.outcome not in (APPLIED, REVOKED)

    @property
    def digests(self) -> set[str]:
        return {hashlib.sha256(raw).hexdigest() for raw in self.raws}

    @property
    def oversize(self) -> bool:
        return any(len(raw) > MAX_PAYLOAD for raw in self.raws)


@dataclass
class Corpus:
    cases: list[Case] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    #: The case each secret was made for (by its index in `cases`).
    owners: dict[str, int] = field(default_factory=dict)

    def token(self) -> str:
        # Fixed width, so that no token is part of another.
        return f"tk{len(self.cases):03d}{uuid.uuid4().hex[:6]}z"

    def secret(self, short: bool = False) -> str:
        """A password no test data shares, with characters each escaping changes."""
        number = len(self.secrets)
        value = (f"q{number:02d}/é+" if short else
                 f"Pw{number:03d}/\"é+'{uuid.uuid4().hex[:10]}")
        self.secrets.append(value)
        self.owners[value] = len(self.cases)
        return value

    def add(self, name: str, outcome: str, raws: bytes | list[bytes], token: str, *,
            task_id: Any = AUTO, key: Any = AUTO, result: Any = AUTO, target: str = "",
            preset: int = 0, evidence: str | None = None, known: str = "") -> None:
        if task_id is AUTO:
            task_id = f"{token}-id"
        if key is AUTO:
            key = task_id
        if result is AUTO:
            result = None if not task_id else (
                SUCCESS if outcome == APPLIED else "REVOKED" if outcome == REVOKED else FAILURE)
        self.cases.append(Case(name, token, raws if isinstance(raws, list) else [raws],
                               outcome, result, task_id, key, target, preset, evidence,
                               known))


def build_corpus() -> Corpus:
    c = Corpus()

    # A command_id belongs to one task (first, so that one batch applies them in order).
    shared = f"k-{uuid.uuid4().hex}"
    tok = c.token()
    c.add("a command_id applied first", APPLIED, dump(envelope(
        tok, kwargs={"data": {"name": tok}, "command_id": shared})), tok, key=shared)
    tok = c.token()
    c.add("the command_id again on another task", CONFLICT, dump(envelope(
        tok, "users.create", {"data": user(tok, c.secret()), "command_id": shared})), tok,
        key=shared)
    tok = c.token()
    c.add("the command_id again on the same task", APPLIED, dump(envelope(
        tok, kwargs={"data": {"name": "never-made"}, "command_id": shared})), tok, key=shared)

    # Identical bytes sent more than MAX_DELIVERIES times, all taken at once (the first take
    # is the first 100 items): each copy is another delivery of the same item to the node.
    tok = c.token()
    c.add(f"identical raw bytes {MAX_DELIVERIES + 2} times in one take", APPLIED,
          [dump(envelope(tok))] * (MAX_DELIVERIES + 2), tok)

    # 1. One message stopped the old consumers.
    for name, body in [("body ''", ""), ("body 'hello'", "hello"), ("body '[1]'", "[1]"),
                       ("body 'null'", "null"), ("body '{}' as text", "{}"),
                       ("body of two elements", '[[], {"data": {"name": "x"}}]'),
                       ("body of four elements", '[[], {"data": {"name": "x"}}, {}, {}]'),
                       ("body args not a list", '[{}, {"data": {"name": "x"}}, {}]'),
                       ("body kwargs not an object", '[[], [], {}]'),
                       ("body embed not an object", '[[], {"data": {"name": "x"}}, "x"]')]:
        tok = c.token()
        c.add(name, UNDECODABLE, dump(with_body(envelope(tok), body)), tok)
    for name, body in [("body {} (not text)", {}), ("body null", None), ("body [1]", [1]),
                       ("body a JSON list", [[], {"data": {"name": "x"}}, {}]),
                       ("body a number", 16)]:
        tok = c.token()
        c.add(name, UNDECODABLE, dump(with_body(envelope(tok), body)), tok)
    tok = c.token()
    message = envelope(tok)
    message["headers"] = None
    message["properties"]["correlation_id"] = tok
    c.add("headers null", UNDECODABLE, dump(message), tok, task_id=None)
    for name, timelimit in [("timelimit 'x'", "x"), ("timelimit null", None),
                            ("timelimit [true, true]", [True, True]),
                            ("timelimit [-1, -1]", [-1, -1]), ("timelimit [{}, []]", [{}, []]),
                            ("timelimit of three", [1, 2, 3]),
                            ("timelimit near 1e9", [999_999_999, 999_999_998])]:
        tok = c.token()
        message = envelope(tok)
        message["headers"]["timelimit"] = timelimit
        c.add(name, APPLIED, dump(message), tok)
    for name, raw_limit in [("timelimit [NaN, Infinity]", "[NaN, Infinity]"),
                            ("timelimit [1e400, -1e400]", "[1e400, -1e400]")]:
        tok = c.token()
        message = envelope(tok)
        message["headers"]["timelimit"] = "@LIMIT@"
        c.add(name, APPLIED, dump(message, raw={"LIMIT": raw_limit}), tok)
    tok = c.token()
    message = envelope(tok)
    message["body"] = b64(f'[{nested(900, "1", "[", "]")}, {{"data": {{"name": "{tok}"}}}}, {{}}]')
    c.add("args nested 900 deep", INVALID, dump(message), tok)
    tok = c.token()
    c.add("body nested 900 deep", UNDECODABLE, dump(with_body(
        envelope(tok), nested(900, "[]", "[", "]"))), tok)
    tok = c.token()
    message = envelope(tok)
    message["headers"] = {name: None if name not in ("task", "id") else value
                          for name, value in message["headers"].items()}
    c.add("every other header null", APPLIED, dump(message), tok)
    tok = c.token()
    message = with_body(envelope(tok), json.dumps([[], {"data": {"name": tok}}, {}]), None)
    message["properties"] = dict.fromkeys(message["properties"])
    c.add("every property null, a utf-8 body", APPLIED, dump(message), tok)
    tok = c.token()
    c.add("kwargs nested 480 deep", INVALID, dump(envelope(
        tok, kwargs={"data": {"name": tok}, "deep": json.loads(nested(480))})), tok)

    # 2. Redis's Lua JSON reads 0x10, Python does not.
    tok = c.token()
    c.add("body 0x10", UNDECODABLE, dump(envelope(tok), raw={}).replace(
        b'"body": "', b'"body": 0x10, "was": "'), tok, task_id=None)

    # 3. Values that looped the old consumers.
    for name, value in [("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"),
                        ("1e400", "1e400"), ("an integer of 400 digits", "9" * 400),
                        ("a lone surrogate", '"\\ud800"'), ("a lone low surrogate",
                                                             '"x\\udfff"'),
                        ("NUL", '"nul\\u0000"')]:
        tok = c.token()
        body = '[[], {"data": {"name": VALUE, "note": "TOKEN"}}, {}]'
        c.add(f"tag name {name} (utf-8 body)", INVALID, dump(with_body(
            envelope(tok), body.replace("VALUE", value).replace("TOKEN", tok))), tok)
        tok = c.token()
        message = envelope(tok)
        message["body"] = b64(body.replace("VALUE", value).replace("TOKEN", tok))
        c.add(f"tag name {name} (base64 body)", INVALID, dump(message), tok)
    for name, key in [("a lone surrogate in a key", "\\ud800"), ("NUL in a key", "na\\u0000me"),
                      ("a lone surrogate in a kwargs key", "")]:
        tok = c.token()
        body = ('[[], {"data": {"name": "TOKEN", "KEY": 1}}, {}]' if key else
                '[[], {"data": {"name": "TOKEN"}, "\\udcff": 1}, {}]')
        c.add(name, INVALID, dump(with_body(envelope(tok), body.replace(
            "KEY", key).replace("TOKEN", tok))), tok)
    secret = c.secret()
    tok = c.token()
    c.add("a top-level password kwarg", INVALID, dump(envelope(
        tok, "users.create", {"data": user(tok, "correct horse"), "password": secret})), tok)
    for depth in (500, 700, 900):
        tok = c.token()
        body = json.dumps([[], {"data": {"name": tok}, "deep": "@DEEP@"}, {}]).replace(
            '"@DEEP@"', nested(depth))
        message = envelope(tok)
        message["body"] = b64(body)
        c.add(f"kwargs nested {depth} deep", INVALID, dump(message), tok)
    tok = c.token()
    c.add("NUL inside password_hash", INVALID, dump(with_body(envelope(tok, "users.create"), (
        '[[], {"data": {"username": "TOKEN", "email": "TOKEN@example.com", '
        '"password_hash": "$argon2id$v=19$m=1024,t=1,p=1$\\u0000"}}, {}]').replace(
            "TOKEN", tok))), tok)
    for method, name, size in [("zlib", "application/x-gzip", 100 << 20),
                               ("zlib", "zlib", 10 << 20),
                               ("bz2", "application/x-bz2", 20 << 20),
                               ("lzma", "application/x-lzma", 20 << 20)]:
        tok = c.token()
        c.add(f"{method} bomb ({size >> 20} MB inside, {name})", INVALID, dump(compressed(
            envelope(tok), b"\0" * size, method, name)), tok)
        tok = c.token()
        c.add(f"{method} bomb of JSON ({name})", INVALID, dump(compressed(
            envelope(tok), b'[[], {"data": {"name": "' + b"x" * (MAX_PAYLOAD + 1) + b'"}}, {}]',
            method, name)), tok)

    # 4. Passwords shown in plain text by the old consumers.
    for key_name in ("password", "Password", "PASSWORD", "new_password", "passwd", "pwd",
                     "secret", "token", "pass_word", "Pass-Word", "api_key", "x-auth-token",
                     "credentials", FULLWIDTH_PASSWORD):
        tok = c.token()
        if key_name != "password":  # data.password is the field itself
            c.add(f"'{key_name}' in data", INVALID, dump(envelope(
                tok, "users.create", {"data": {**user(tok, "correct horse"),
                                               key_name: c.secret()}})), tok)
            tok = c.token()
        tok = c.token()
        c.add(f"'{key_name}' as a kwarg", INVALID, dump(envelope(
            tok, kwargs={"data": {"name": tok}, key_name: c.secret()})), tok)
    for name, kwargs_of in [
        ("password nested under another key", lambda t, s: {"data": {"name": t},
                                                            "meta": {"auth": {"password": s}}}),
        ("password in a list of objects", lambda t, s: {"data": {"name": t},
                                                        "items": [{"x": 1}, {"password": s}]}),
        ("password as a list", lambda t, s: {"data": {"name": t}, "password": [s, s]}),
        ("password as an object", lambda t, s: {"data": {"name": t}, "password": {"v": s}}),
        ("password nested 40 deep", lambda t, s: {"data": {"name": t},
                                                  "deep": json.loads(nested(
                                                      40, json.dumps({"password": s})))}),
        ("password at the bottom of 900 levels", lambda t, s: {
            "data": {"name": t}, "deep": "@DEEP@", "secret": s}),
        ("data as a JSON string", lambda t, s: {"data": json.dumps(user(t, s))}),
        ("data as a Python repr", lambda t, s: {"data": repr(user(t, s))}),
        ("data as a list", lambda t, s: {"data": [user(t, s)]}),
        ("a password in form-encoded text", lambda t, s: {
            "data": {"name": t}, "note": f"user={t}&password={quote_plus(s)}"}),
        ("a password in YAML text", lambda t, s: {"data": {"name": t},
                                                 "note": f"user: {t}\npassword: {s}\n"}),
    ]:
        tok = c.token()
        kwargs = kwargs_of(tok, c.secret())
        if kwargs.get("deep") == "@DEEP@":
            message = envelope(tok, kwargs={**kwargs, "deep": None})
            message["body"] = b64(json.dumps([[], {**kwargs, "deep": "@DEEP@"}, {}]).replace(
                '"@DEEP@"', nested(900, json.dumps({"password": c.secrets[-1]}))))
            c.add(name, INVALID, dump(message), tok)
            continue
        task = "users.create" if name.startswith("data as") else "tags.create"
        c.add(name, INVALID, dump(envelope(tok, task, kwargs)), tok)
    for name, args_of in [("a positional password", lambda t, s: [s]),
                          ("positional user fields", lambda t, s: [t, f"{t}@example.com", s]),
                          ("a positional object", lambda t, s: [{"password": s}]),
                          ("a positional list", lambda t, s: [[t, [s]]])]:
        tok = c.token()
        c.add(name, INVALID, dump(envelope(tok, "users.create", {}, args=args_of(
            tok, c.secret()))), tok)
    # Unknown tasks and undecodable messages: their raw item is kept, redacted.
    secret = c.secret()
    tok = c.token()
    kwargs = {"data": user(tok, secret)}
    message = envelope(tok, "users.explode", kwargs)
    message["headers"]["kwargsrepr"] = repr(kwargs)  # stock Celery's, single-quoted
    message["headers"]["argsrepr"] = repr([secret])
    c.add("unknown task, stock Celery kwargsrepr", UNKNOWN, dump(message), tok)
    tok = c.token()
    kwargs = {"data": user(tok, c.secret())}
    c.add("unknown task, utf-8 body", UNKNOWN, dump(with_body(
        envelope(tok, "users.explode", kwargs), json.dumps([[], kwargs, {}]))), tok)
    tok = c.token()
    secret = c.secret()
    escaped = "".join(f"\\u{ord(char):04x}" for char in secret)
    c.add("unknown task, the password \\u-escaped in the body", UNKNOWN, dump(with_body(
        envelope(tok, "users.explode", {}),
        f'[[], {{"data": {{"p\\u0061ssword": "{escaped}", "name": "{tok}"}}}}, {{}}]')), tok)
    tok = c.token()
    kwargs = {"data": user(tok, c.secret())}
    c.add("unknown task, compressed body", UNKNOWN, dump(compressed(
        envelope(tok, "users.explode", kwargs), json.dumps([[], kwargs, {}]).encode(), "zlib",
        "application/x-gzip")), tok)
    tok = c.token()
    c.add("unknown task, positional password", UNKNOWN, dump(envelope(
        tok, "users.explode", {}, args=[c.secret()])), tok)
    tok = c.token()
    secret = c.secret()
    c.add("unknown task named with a password", UNKNOWN, dump(envelope(
        tok, json.dumps({"password": secret}), {"data": {"name": tok}})), tok)
    tok = c.token()
    message = envelope(tok)
    message["content-type"] = "application/x-python-serialize"
    message["content-encoding"] = "binary"
    message["body"] = b64(pickle.dumps(((), {"data": user(tok, c.secret())}, {})))
    c.add("pickle", UNDECODABLE, dump(message), tok)
    tok = c.token()
    message = with_body(envelope(tok), f"- []\n- data:\n    username: {tok}\n"
                                       f"    password: {c.secret()}\n- {{}}\n")
    message["content-type"] = "application/x-yaml"
    c.add("yaml", UNDECODABLE, dump(message), tok)
    tok = c.token()
    message = with_body(envelope(tok), json.dumps([[], {"data": user(tok, c.secret())}, {}]))
    message["content-type"] = "application/x-yaml"
    c.add("yaml that is JSON", UNDECODABLE, dump(message), tok)
    tok = c.token()
    message = envelope(tok)
    message["content-type"] = "application/x-msgpack"
    message["content-encoding"] = "binary"
    message["body"] = b64(msgpack_map("password", c.secret()))
    c.add("msgpack", UNDECODABLE, dump(message), tok)
    tok = c.token()
    secret = c.secret()
    c.add("undecodable body with a password", UNDECODABLE, dump(with_body(envelope(
        tok), json.dumps([[secret], {"data": user(tok, secret)}])), compact=True), tok)
    tok = c.token()
    c.add("a body of args only, with a password", UNDECODABLE, dump(with_body(envelope(
        tok), json.dumps([[tok, c.secret()]]))), tok)
    tok = c.token()
    c.add("a body not serialized, with a positional password", UNDECODABLE, dump(with_body(
        envelope(tok), [[c.secret()], {"data": {"name": tok}}, {}])), tok)
    tok = c.token()
    c.add("a bare body on the queue, with a positional password", UNDECODABLE,
          json.dumps([[tok, c.secret()], {"case": tok}, {}]).encode(), tok, task_id=None)
    tok = c.token()
    c.add("a body that is a JSON string", UNDECODABLE, dump(with_body(envelope(
        tok), json.dumps(c.secret()))), tok)
    tok = c.token()
    message = envelope(tok)
    message["headers"] = {"case": tok}
    message["body"] = b64(json.dumps({"task": "users.create", "id": f"{tok}-p1",
                                      "args": [tok, c.secret()],
                                      "kwargs": {"data": user(tok, c.secret())}}))
    c.add("Celery protocol 1, positional password", UNDECODABLE, dump(message), tok,
          task_id=None)
    tok = c.token()
    message = envelope(tok)
    message["headers"]["password"] = c.secret()
    message["headers"]["task"] = 7
    c.add("undecodable with a password header", UNDECODABLE, dump(message), tok)
    tok = c.token()
    message = envelope(tok, "users.create", {"data": user(tok, c.secret())})
    message["content-type"] = "text/plain"
    c.add("users.create as text/plain", UNDECODABLE, dump(message), tok)
    # Valid commands carrying passwords: applied, the password nowhere.
    tok = c.token()
    c.add("users.create, compact headers", APPLIED, dump(envelope(
        tok, "users.create", {"data": user(tok, c.secret())}), compact=True), tok)
    tok = c.token()
    secret = c.secret()
    kwargs = {"data": user(tok, secret)}
    message = envelope(tok, "users.create", kwargs)
    message["headers"]["kwargsrepr"] = repr(kwargs)
    message["headers"]["argsrepr"] = "()"
    c.add("users.create, stock Celery kwargsrepr", APPLIED, dump(message), tok)
    tok = c.token()
    kwargs = {"data": user(tok, c.secret())}
    c.add("users.create, utf-8 body", APPLIED, dump(with_body(
        envelope(tok, "users.create", kwargs), json.dumps([[], kwargs, {}]))), tok)
    tok = c.token()
    message = envelope(tok, "users.create", {"data": user(tok, c.secret())})
    message["headers"]["password"] = c.secret()
    message["headers"]["root_id"] = {"password": c.secret()}
    message["headers"]["parent_id"] = f"password={c.secret()}"
    c.add("users.create, passwords in headers", APPLIED, dump(message), tok)
    tok = c.token()
    c.add("users.update of no user, with a password", NOT_FOUND, dump(envelope(
        tok, "users.update", {"id": 2_000_000_000, "data": {"password": c.secret()}})), tok)
    tok = c.token()
    c.add("a password too short", INVALID, dump(envelope(
        tok, "users.create", {"data": user(tok, c.secret(short=True))})), tok)
    tok = c.token()
    c.add("a password too long", INVALID, dump(envelope(
        tok, "users.create", {"data": user(tok, c.secret() * 7)})), tok)
    tok = c.token()
    c.add("a password with NUL", INVALID, dump(envelope(
        tok, "users.create", {"data": user(tok, c.secret() + "\0")})), tok)
    tok = c.token()
    c.add("a password of the wrong type", INVALID, dump(envelope(
        tok, "users.create", {"data": user(tok, [c.secret()])})), tok)

    # 5. password_hash is not a producer field.
    tok = c.token()
    c.add("data.password_hash", INVALID, dump(envelope(tok, "users.create", {"data": {
        "username": tok, "email": f"{tok}@example.com",
        "password_hash": "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"}})), tok)

    # 6. Silent loss.
    tok = c.token()
    c.add("id null, no command_id", INVALID, dump(envelope(tok, task_id=None)), tok,
          task_id=None)
    tok = c.token()
    c.add("id null, a command_id", APPLIED, dump(envelope(
        tok, kwargs={"data": {"name": tok}, "command_id": f"{tok}-cid"}, task_id=None)), tok,
        task_id=None, key=f"{tok}-cid")
    for name, task_id in [("id 5", 5), ("id []", []), ("id {}", {}), ("id true", True),
                          ("id ''", ""), ("id missing", AUTO)]:
        tok = c.token()
        message = envelope(tok)
        if task_id is AUTO:
            del message["headers"]["id"]
        else:
            message["headers"]["id"] = task_id
        c.add(f"{name}, no command_id", INVALID, dump(message), tok, task_id=None)
    tok = c.token()
    message = envelope(tok, kwargs={"data": {"name": tok}, "command_id": f"{tok}-cid"})
    message["headers"]["id"] = 5
    c.add("id 5, a command_id", APPLIED, dump(message), tok, task_id=None, key=f"{tok}-cid")
    for name, task_id in [("a task id with NUL", "nul\0id"), ("a task id of 300 characters",
                                                              "x" * 300)]:
        tok = c.token()
        c.add(f"{name}, no command_id", INVALID, dump(envelope(tok, task_id=task_id + tok)), tok,
              task_id=task_id + tok, key=None)
    tok = c.token()
    c.add("a task id with a lone surrogate, no command_id", INVALID, dump(
        envelope(tok, task_id="@ID@"), raw={"ID": f'"{tok}\\ud800"'}), tok, task_id=None)
    tok = c.token()
    c.add("a task id with a lone surrogate, a command_id", APPLIED, dump(envelope(
        tok, kwargs={"data": {"name": tok}, "command_id": f"{tok}-cid"}, task_id="@ID@"),
        raw={"ID": f'"{tok}\\ud800"'}), tok, task_id=None, key=f"{tok}-cid")
    # Over the size limit: kombu writes the headers last, so the task id can be read.
    tok = c.token()
    secret = c.secret()
    kwargs = {"data": {"name": "x" * MAX_PAYLOAD, "password": secret}}
    message = envelope(tok, kwargs=kwargs)
    message["headers"]["kwargsrepr"] = repr({"data": {"password": secret}})
    c.add("over the size limit, headers last", INVALID, dump(message), tok)
    tok = c.token()
    message = envelope(tok, kwargs={"data": {"name": "y" * MAX_PAYLOAD}})
    message = {"headers": message["headers"], "properties": message["properties"],
               "content-type": JSON_TYPE, "content-encoding": "utf-8", "body": message["body"]}
    c.add("over the size limit, headers first", INVALID, dump(message), tok, task_id=None)
    for name, extra, outcome in [("exactly the size limit", 0, APPLIED),
                                 ("one byte over the size limit", 1, INVALID)]:
        tok = c.token()
        message = envelope(tok)
        small = len(dump({"pad": "", **message}))
        c.add(name, outcome, dump({"pad": "p" * (MAX_PAYLOAD - small + extra), **message}), tok)
    tok = c.token()
    raw = b"x" * (MAX_PAYLOAD + 10)
    c.add("over the size limit, not JSON", INVALID, raw, tok, task_id=None)
    # Raw items that are no envelope at all.
    for name, raw in [("an empty item", b""), ("garbage", b"garbage"),
                      ("invalid UTF-8", b"\xff\xfe\x00\x80{"), ("JSON null", b"null"),
                      ("JSON []", b"[]"), ("JSON string", b'"hello"'), ("JSON number", b"16"),
                      ("JSON {}", b"{}"), ("a truncated envelope", b'{"body": "W10=", "hea'),
                      ("an envelope nested 1100 deep",
                       nested(1100, '""', '{"headers": ', "}").encode()),
                      ("a list nested 100000 deep", b"[" * 100_000 + b"]" * 100_000)]:
        tok = c.token()
        try:
            parsed = json.loads(raw)
            # A bare string has no name to go by: it could be a password, so it is redacted.
            evidence = json.dumps("[redacted]" if isinstance(parsed, str) else parsed,
                                  separators=(",", ":"))
        except (ValueError, RecursionError):
            evidence = None
        c.add(name, UNDECODABLE, raw, tok, task_id=None, evidence=evidence)

    # Null, and wrong types, wherever a header or property can be.
    for name, change, outcome, readable in [
        ("task null", {"task": None}, UNDECODABLE, True),
        ("task 5", {"task": 5}, UNDECODABLE, True),
        ("task missing", {"task": AUTO}, UNDECODABLE, True),
        ("task ''", {"task": ""}, UNKNOWN, True),
        ("eta null", {"eta": None}, APPLIED, True),
        ("eta 5", {"eta": 5}, INVALID, True),
        ("eta 'tomorrow'", {"eta": "tomorrow"}, INVALID, True),
        ("eta of 10,000 characters", {"eta": "2" * 10_000}, INVALID, True),
        ("eta in the past", {"eta": "2001-01-01T00:00:00+00:00"}, APPLIED, True),
        ("eta in year 1, +14:00", {"eta": "0001-01-01T00:00:00+14:00"}, APPLIED, True),
        ("eta in 2 s", {"eta": (datetime.now(UTC) + timedelta(seconds=2)).isoformat()},
         APPLIED, True),
        ("expires null", {"expires": None}, APPLIED, True),
        ("expires 'x'", {"expires": "x"}, INVALID, True),
        ("expires 5", {"expires": 5}, INVALID, True),
        ("expires in year 9999", {"expires": "9999-12-31T23:59:59"}, APPLIED, True),
        ("expires in the past", {"expires": "2001-01-01T00:00:00Z"}, REVOKED, True),
        ("ignore_result true", {"ignore_result": True}, APPLIED, False),
        ("ignore_result 'yes'", {"ignore_result": "yes"}, APPLIED, True),
        ("ignore_result null", {"ignore_result": None}, APPLIED, True),
        ("compression null", {"compression": None}, APPLIED, True),
        ("compression 5", {"compression": 5}, UNDECODABLE, True),
        ("compression ''", {"compression": ""}, UNDECODABLE, True),
        ("compression zstd", {"compression": "application/zstd"}, UNDECODABLE, True),
        ("compression brotli", {"compression": "application/x-brotli"}, UNDECODABLE, True),
        ("compression gzip of a plain body", {"compression": "application/x-gzip"},
         UNDECODABLE, True),
        ("retries 'x'", {"retries": "x"}, APPLIED, True),
        ("retries 2**70", {"retries": 2**70}, APPLIED, True),
        ("root_id nested 900 deep", {"root_id": "@DEEP@"}, APPLIED, True),
        ("parent_id a lone surrogate", {"parent_id": "@SURROGATE@"}, APPLIED, True),
        ("group an object", {"group": {"x": 1}}, APPLIED, True),
        ("a header nested 900 deep", {"x-deep": "@DEEP@"}, APPLIED, True),
        ("a header with NaN", {"x-nan": "@NAN@"}, APPLIED, True),
        ("a task name with a lone surrogate", {"task": "@SURROGATE@"}, UNKNOWN, True),
    ]:
        tok = c.token()
        message = envelope(tok)
        for header, value in change.items():
            if value is AUTO:
                del message["headers"][header]
            else:
                message["headers"][header] = value
        raw_text = {"DEEP": nested(900, '"x"', "[", "]"), "SURROGATE": '"\\ud800"',
                    "NAN": "NaN"}
        result = AUTO if readable else None
        c.add(name, outcome, dump(message, raw=raw_text), tok, result=result)
    tok = c.token()
    message = envelope(tok, kwargs={"data": {"name": tok, "x": 1}})
    message["headers"]["ignore_result"] = True
    c.add("ignore_result true, rejected", INVALID, dump(message), tok, result=None)
    for name, change, outcome in [
        ("properties null", None, UNDECODABLE),
        ("properties a list", [], UNDECODABLE),
        ("body_encoding null", {"body_encoding": None}, UNDECODABLE),
        ("body_encoding 5", {"body_encoding": 5}, UNDECODABLE),
        ("body_encoding utf-16", {"body_encoding": "utf-16"}, UNDECODABLE),
        ("priority 'high'", {"priority": "high"}, APPLIED),
        ("priority null", {"priority": None}, APPLIED),
        ("priority -1", {"priority": -1}, APPLIED),
        ("priority {}", {"priority": {}}, APPLIED),
        ("delivery_info null", {"delivery_info": None}, APPLIED),
        ("delivery_tag a list", {"delivery_tag": [1]}, APPLIED),
        ("reply_to an object", {"reply_to": {"x": [1]}}, APPLIED),
    ]:
        tok = c.token()
        message = envelope(tok)
        if change is None or isinstance(change, list):
            message["properties"] = change
        else:
            message["properties"].update(change)
        c.add(name, outcome, dump(message), tok)
    for name, change, outcome in [("content-type null", None, UNDECODABLE),
                                  ("content-type missing", AUTO, UNDECODABLE),
                                  ("content-type with a charset",
                                   "application/json; charset=utf-8", UNDECODABLE),
                                  ("content-type in capitals", "APPLICATION/JSON", UNDECODABLE),
                                  ("content-encoding null", "", APPLIED),
                                  ("content-encoding latin-1", "latin-1", APPLIED)]:
        tok = c.token()
        message = envelope(tok)
        if name.startswith("content-encoding"):
            message["content-encoding"] = change or None
        elif change is AUTO:
            del message["content-type"]
        else:
            message["content-type"] = change
        c.add(name, outcome, dump(message), tok)

    # Bodies in other encodings, base64 that is not.
    body = lambda t: json.dumps([[], {"data": {"name": t}}, {}])  # noqa: E731
    for name, encode_body, outcome in [
        ("base64 that is not base64", lambda t: "!!not base64!!", UNDECODABLE),
        ("base64 without its padding", lambda t: b64(body(t) + "x").rstrip("="), UNDECODABLE),
        # As the `base64` tool writes it, wrapped at 76 columns (kombu reads it too).
        ("base64 with line breaks", lambda t: "\n".join(
            b64(body(t))[start:start + 76] for start in range(0, len(b64(body(t))), 76)),
         APPLIED),
        ("base64 of UTF-16", lambda t: b64(body(t).encode("utf-16")), UNDECODABLE),
        ("base64 of UTF-8 with a BOM", lambda t: b64(b"\xef\xbb\xbf" + body(t).encode()),
         UNDECODABLE),
        ("base64 of Latin-1", lambda t: b64(json.dumps(
            [[], {"data": {"name": t + "\xe9"}}, {}], ensure_ascii=False).encode("latin-1")),
         UNDECODABLE),
        ("base64 of base64", lambda t: b64(b64(body(t))), UNDECODABLE),
        ("a utf-8 body that is base64", lambda t: "@UTF8@", UNDECODABLE),
    ]:
        tok = c.token()
        message = envelope(tok)
        message["body"] = encode_body(tok)
        if message["body"] == "@UTF8@":
            message = with_body(message, b64(body(tok)))
        c.add(name, outcome, dump(message), tok)
    for method, name in [("zlib", "application/x-gzip"), ("zlib", "zlib"),
                         ("bz2", "application/x-bz2"), ("bz2", "bzip2"),
                         ("lzma", "application/x-lzma"), ("lzma", "lzma")]:
        tok = c.token()
        c.add(f"compressed with {name}", APPLIED, dump(compressed(
            envelope(tok), body(tok).encode(), method, name)), tok)
        tok = c.token()
        message = compressed(envelope(tok), body(tok).encode(), method, name)
        message["body"] = b64(base64.b64decode(message["body"])[:-4])
        c.add(f"truncated {name}", UNDECODABLE, dump(message), tok)
    tok = c.token()
    message = compressed(envelope(tok), body(tok).encode(), "zlib", "application/x-gzip")
    message["body"] = b64(b"\x1f\x8b" + base64.b64decode(message["body"]))
    c.add("gzip header on a zlib body", UNDECODABLE, dump(message), tok)

    # Canvas that is not canvas.
    # Celery reads it after the command has run: refused before, or the committed command
    # would end as a FAILURE.
    for name, embed, outcome in [
        ("embed null", "null", APPLIED),
        ("no callbacks", '{"callbacks": null, "errbacks": [], "chain": null, "chord": null}',
         APPLIED),
        ("callbacks 'x'", '{"callbacks": "x"}', INVALID),
        ("chain 5", '{"chain": 5}', INVALID),
        ("errbacks [{}]", '{"errbacks": [{}]}', INVALID),
        ("chord [1]", '{"chord": [1]}', INVALID),
        ("callbacks [{}]", '{"callbacks": [{}]}', INVALID),
        ("a callback whose options are 5", '{"callbacks": [{"task": "tags.create", '
                                           '"options": 5}]}', INVALID),
        ("a callback whose kwargs are a list", '{"callbacks": [{"task": "tags.create", '
                                               '"kwargs": []}]}', INVALID),
        ("chain nested 900 deep", '{"chain": DEEP}', INVALID),
    ]:
        tok = c.token()
        message = envelope(tok)
        message["body"] = b64(f'[[], {{"data": {{"name": "{tok}"}}}}, {embed}]'.replace(
            "DEEP", nested(900, "1", "[", "]")))
        c.add(name, outcome, dump(message), tok)

    # Arguments of the wrong type.
    for name, kwargs_of in [
        ("id '5'", lambda t: {"id": "5", "data": {"name": t}}),
        ("id 1e400", lambda t: {"id": "@1E400@", "data": {"name": t}}),
        ("id NaN", lambda t: {"id": "@NAN@", "data": {"name": t}}),
        ("id 2**70", lambda t: {"id": 2**70, "data": {"name": t}}),
        ("id true", lambda t: {"id": True, "data": {"name": t}}),
        ("id -1", lambda t: {"id": -1, "data": {"name": t}}),
        ("expected_version NaN", lambda t: {"id": 1, "expected_version": "@NAN@",
                                            "data": {"name": t}}),
        ("command_id 5", lambda t: {"command_id": 5, "data": {"name": t}}),
        ("command_id ''", lambda t: {"command_id": "", "data": {"name": t}}),
        ("command_id with NUL", lambda t: {"command_id": "a\0b", "data": {"name": t}}),
        ("command_id of 129 characters", lambda t: {"command_id": "c" * 129,
                                                    "data": {"name": t}}),
        ("101 tags", lambda t: {"data": {"title": t, "author_id": 1,
                                         "tags": [f"{t}-{i}" for i in range(101)]}}),
    ]:
        tok = c.token()
        task = ("posts.create" if name == "101 tags" else
                "tags.update" if "id" in kwargs_of(tok) else "tags.create")
        message = envelope(tok)
        message["headers"]["task"] = task
        message["body"] = "@BODY@"
        body_text = json.dumps([[], kwargs_of(tok), {}]).replace(
            '"@1E400@"', "1e400").replace('"@NAN@"', "NaN")
        c.add(name, INVALID, dump(message, raw={"BODY": json.dumps(b64(body_text))}), tok)
    for name, data in [("email with NUL", {"email": "a\0@example.com"}),
                       ("is_active 'yes'", {"is_active": "yes"}),
                       ("username of 51 characters", {"username": "u" * 51})]:
        tok = c.token()
        c.add(name, INVALID, dump(envelope(tok, "users.create", {"data": {
            **user(tok, c.secret()), **data}})), tok)

    # Duplicates, priorities, envelopes read alike by both parsers, redelivery.
    tok = c.token()
    c.add("identical raw bytes twice", APPLIED, [dump(envelope(tok))] * 2, tok)
    tok = c.token()
    c.add(f"identical raw bytes {MAX_DELIVERIES} times", APPLIED,
          [dump(envelope(tok))] * MAX_DELIVERIES, tok)
    for step in (3, 6, 9):
        tok = c.token()
        c.add(f"priority list {step}", APPLIED, dump(envelope(tok)), tok,
              target=f"{PRIORITY_SEPARATOR}{step}")
    tok = c.token()
    c.add("garbage in priority list 9", UNDECODABLE, b"garbage " + tok.encode(), tok,
          task_id=None, target=f"{PRIORITY_SEPARATOR}9")
    tok = c.token()
    c.add("a key given twice", APPLIED, dump(envelope(tok)).replace(
        b'{"case"', b'{"body": "W10=", "case"'), tok)
    tok = c.token()
    c.add("a BOM before the envelope", UNDECODABLE, b"\xef\xbb\xbf" + dump(envelope(tok)), tok,
          task_id=None)
    tok = c.token()
    c.add("an envelope in UTF-16", UNDECODABLE, dump(envelope(tok)).decode().encode("utf-16"),
          tok, task_id=None)
    tok = c.token()
    c.add("delivered MAX_DELIVERIES times before", EXHAUSTED, dump(envelope(tok)), tok,
          preset=MAX_DELIVERIES)
    return c


# --- the run --------------------------------------------------------------------------------

class Listener:
    """Everything published while it listens: Celery task events, and every raw PUBLISH."""

    def __init__(self, broker: str) -> None:
        self.app = Celery("hostile-listener", broker=broker)
        self.events: list[dict[str, Any]] = []
        self.published: list[tuple[bytes, bytes]] = []
        self.receiver: Any = None
        self.stopping = threading.Event()
        self.pubsub = redis.Redis.from_url(broker).pubsub()
        self.pubsub.psubscribe("*")
        self.threads = [threading.Thread(target=self._events, daemon=True),
                        threading.Thread(target=self._raw, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _events(self) -> None:
        with self.app.connection() as connection:
            self.receiver = self.app.events.Receiver(
                connection, handlers={"*": self.events.append})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def _raw(self) -> None:
        while not self.stopping.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if message is not None and message["type"] == "pmessage":
                self.published.append((message["channel"], message["data"]))

    def stop(self) -> None:
        self.stopping.set()
        if self.receiver is not None:
            self.receiver.should_stop = True
        for thread in self.threads:
            thread.join(10)
        self.pubsub.close()


@dataclass
class Run:
    """What the module's worker did with the corpus, collected once."""

    corpus: Corpus
    database: str
    broker: str
    letters: list[dict[str, Any]]
    ledger: dict[str, dict[str, Any]]
    results: dict[str, dict[str, Any]]
    leftovers: dict[str, int]
    redis_dump: list[bytes]
    tables: dict[str, list[str]]
    events: list[dict[str, Any]]
    published: list[tuple[bytes, bytes]]
    logs: list[str]
    cli: dict[str, str]
    fresh: dict[str, bool]
    elapsed: float
    stalled: str = ""


def free_redis_database(server: str) -> str:
    """The URL of an empty database of the suite's Redis server (not 0: the suite's own)."""
    base = server.rsplit("/", 1)[0]
    for number in range(15, 0, -1):
        url = f"{base}/{number}"
        if redis.Redis.from_url(url).dbsize() == 0:
            return url
    raise RuntimeError("no empty Redis database on the suite's server")


def migrated_database(server: str) -> str:
    url = _fresh_database(server)
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    config.attributes["database_url"] = url
    alembic_command.upgrade(config, "head")
    return url


def publish(client: redis.Redis, corpus: Corpus) -> None:
    """The whole corpus in one MULTI: the node sees it all at its first take."""
    pipe = client.pipeline(transaction=True)
    for case in corpus.cases:
        raws = [stored(raw, case.preset) for raw in case.raws] if case.preset else case.raws
        pipe.lpush(QUEUE + case.target, *raws)
    pipe.execute()


def leftovers(client: redis.Redis) -> dict[str, int]:
    counts = {name: client.llen(name) for name in KEYS.lists}
    counts[KEYS.unacked] = client.hlen(KEYS.unacked)
    counts[KEYS.unacked_index] = client.zcard(KEYS.unacked_index)
    counts[KEYS.delayed] = client.zcard(KEYS.delayed)
    counts[KEYS.delayed_items] = client.hlen(KEYS.delayed_items)
    return counts


def read_letters(url: str) -> list[dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [dict(row._mapping) | {"text": row.text} for row in connection.execute(text(
                "SELECT d.*, row_to_json(d)::text || d::text AS text FROM dead_letters d "
                "ORDER BY id"))]
    finally:
        engine.dispose()


def read_ledger(url: str) -> dict[str, dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {row.command_id: dict(row._mapping) for row in connection.execute(text(
                "SELECT command_id, task, result FROM command_ledger"))}
    finally:
        engine.dispose()


def read_tables(url: str) -> dict[str, list[str]]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {table: [row[0] for row in connection.execute(text(
                f"SELECT row_to_json(t)::text || t::text FROM {table} t"))] for table in TABLES}
    finally:
        engine.dispose()


def dump_redis(client: redis.Redis) -> list[bytes]:
    """Every key of the database and its value, whatever its type, as bytes."""
    found: list[bytes] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        found.append(key)
        if kind == b"string":
            found.append(client.get(key) or b"")
        elif kind == b"hash":
            for name, value in client.hgetall(key).items():
                found += [name, value]
        elif kind == b"list":
            found += client.lrange(key, 0, -1)
        elif kind == b"set":
            found += list(client.smembers(key))
        elif kind == b"zset":
            found += [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            found += [repr(entry).encode() for entry in client.xrange(key)]
    return found


def read_results(client: redis.Redis) -> dict[str, dict[str, Any]]:
    results = {}
    for key in client.scan_iter(match="celery-task-meta-*", count=1000):
        meta = json.loads(client.get(key) or b"null")
        results[key.decode("utf-8", "surrogateescape").removeprefix("celery-task-meta-")] = meta
    return results


def cli(database: str, broker: str, *arguments: str) -> str:
    environment = {**os.environ, **TEST_ENV, "DATABASE_URL": database, "BROKER_URL": broker}
    environment.pop("RESULT_BACKEND", None)
    done = subprocess.run([sys.executable, *arguments], cwd=ROOT, env=environment,
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")


SHOW_EVERY_LETTER = """
import sys
from worker.cli import app
for letter_id in sys.argv[1:]:
    app(["dead-letters", "show", letter_id, "--json"], prog_name="python -m worker",
        standalone_mode=False)
"""


def ended(corpus: Corpus, letters: list[dict[str, Any]], ledger: dict[str, Any],
          results: dict[str, Any]) -> bool:
    """Whether every case has (at least) its outcome recorded (known bugs' cases aside)."""
    wanted_letters = sum(case.rejected and not case.known for case in corpus.cases)
    return (len(letters) >= wanted_letters
            and all(case.key in ledger for case in corpus.cases if case.outcome == APPLIED)
            and all(case.task_id in results for case in corpus.cases if case.result))


def apply_fresh(client: redis.Redis, database: str, name: str, timeout: float = 30) -> bool:
    """Whether a fresh, valid command is applied (and answered) in time."""
    client.lpush(QUEUE, encode("tags.create", {"data": {"name": name}}, queue=QUEUE,
                               task_id=name))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = client.get(f"celery-task-meta-{name}")
        if meta is not None:
            return bool(json.loads(meta)["status"] == SUCCESS and name in read_ledger(database))
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def run(servers: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    database = migrated_database(servers[0])
    broker = free_redis_database(servers[1])
    client = redis.Redis.from_url(broker)
    logs_dir = tmp_path_factory.mktemp("hostile")
    environment = {"COMMANDS_QUEUE": QUEUE, "MAX_DELIVERIES": str(MAX_DELIVERIES),
                   "MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD), "BROKER_VISIBILITY_TIMEOUT": "20"}
    options = ("--loglevel", "DEBUG", "--batch-size", "100", "-E")
    listener = Listener(broker)
    workers: list[WorkerProcess] = []
    try:
        workers.append(start_worker(database, broker, logs_dir / "first.log", *options,
                                    env=environment))
        corpus = build_corpus()  # now: its eta of "in 2 s" is still to come
        started = time.monotonic()
        publish(client, corpus)
        stalled = ""
        deadline = started + 60
        while True:
            letters, ledger = read_letters(database), read_ledger(database)
            results = read_results(client)
            drained = not any(leftovers(client).values())
            if drained and ended(corpus, letters, ledger, results):
                break
            if time.monotonic() > deadline:
                stalled = f"not ended in 60 s; left in Redis: {leftovers(client)}"
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        print(f"\n{len(corpus.cases)} cases ({sum(len(case.raws) for case in corpus.cases)} "
              f"items) ended in {elapsed:.1f} s")
        time.sleep(1)  # anything that was still to come (a second outcome) comes now
        letters, ledger, results = read_letters(database), read_ledger(database), \
            read_results(client)
        left = leftovers(client)
        fresh = {"before the restart": apply_fresh(client, database, f"fresh-{uuid.uuid4()}")}
        stop_worker(workers[-1])
        fresh["a clean stop"] = workers[-1].process.returncode == 0
        workers.append(start_worker(database, broker, logs_dir / "second.log", *options,
                                    env=environment))
        fresh["after the restart"] = apply_fresh(client, database, f"fresh-{uuid.uuid4()}")
        # Every one, unless a loop made thousands (then the check of outcomes says so).
        ids = [str(letter["id"]) for letter in letters][:500]
        outputs = {
            "list": cli(database, broker, "-m", "worker", "dead-letters", "list", "--json"),
            "show": cli(database, broker, "-c", SHOW_EVERY_LETTER, *ids) if ids else "",
            "show one": cli(database, broker, "-m", "worker", "dead-letters", "show", ids[0],
                            "--json") if ids else "",
        }
        for worker in workers:
            stop_worker(worker)
        listener.stop()
        yield Run(corpus, database, broker, letters, ledger, results, left, dump_redis(client),
                  read_tables(database), listener.events, listener.published,
                  [worker.log_text() for worker in workers], outputs, fresh, elapsed, stalled)
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
        listener.stop()
        client.flushdb()


# --- the checks -----------------------------------------------------------------------------

def outcome_problems(run: Run, known: str = "") -> list[str]:
    """Every way in which a case did not end in exactly its one outcome.

    `known`: only the cases of that bug, known and not fixed yet (else: every other case).
    """
    problems = []
    claimed: dict[int, list[str]] = {}
    for case in run.corpus.cases:
        if case.known != known:
            for letter in run.letters:
                if case.token in letter["text"]:
                    claimed.setdefault(letter["id"], []).append(case.name)
            continue
        mine = [letter for letter in run.letters if case.token in letter["text"]
                or letter["raw_sha256"] in case.digests
                or (case.evidence is not None and letter["raw_body"] == case.evidence)
                or (case.oversize and letter["raw_sha256"] is None
                    and letter["raw_size"] in {len(raw) for raw in case.raws})]
        for letter in mine:
            claimed.setdefault(letter["id"], []).append(case.name)
        where = f"{case.name!r} ({case.token})"
        if case.rejected:
            if [letter["reason"] for letter in mine] != [case.outcome]:
                problems.append(f"{where}: dead letters {[letter['reason'] for letter in mine]}, "
                                f"expected one {case.outcome}")
            elif mine[0]["command_id"] != case.key:
                problems.append(f"{where}: dead letter keyed {mine[0]['command_id']!r}, "
                                f"expected {case.key!r}")
            if case.key is not None and case.key in run.ledger and case.outcome != CONFLICT:
                problems.append(f"{where}: rejected yet in the ledger")
        else:
            if mine:
                problems.append(f"{where}: {case.outcome} expected, dead letters "
                                f"{[letter['reason'] for letter in mine]}")
            if (case.outcome == APPLIED) != (case.key in run.ledger):
                problems.append(f"{where}: in the ledger: {case.key in run.ledger}")
        meta = run.results.get(case.task_id) if case.task_id else None
        status = meta["status"] if meta else None
        if status != case.result:
            problems.append(f"{where}: result {status}, expected {case.result}")
        elif status == FAILURE:
            message = meta["result"]["exc_message"]
            reason = str(message[0] if isinstance(message, list) else message).split(":")[0]
            if reason != case.outcome:
                problems.append(f"{where}: FAILURE says {reason!r}, expected {case.outcome}")
    for letter in run.letters:
        owners = claimed.get(letter["id"], [])
        if len(owners) != 1 and not known:
            problems.append(f"dead letter {letter['id']} ({letter['reason']}, "
                            f"{letter['error'][:80]!r}) belongs to {owners or 'no case'}")
    expected_results = {case.task_id for case in run.corpus.cases if case.result}
    if known:
        return problems
    strays = {task_id for task_id in run.results
              if task_id not in expected_results and not task_id.startswith(("probe-",
                                                                              "fresh-"))}
    if strays:
        problems.append(f"results stored under no case's task id: {sorted(strays)[:10]}")
    return problems


def test_every_message_ends_in_exactly_its_one_outcome(run: Run) -> None:
    problems = outcome_problems(run)
    shown = "\n".join(problem[:300] for problem in problems[:200])
    assert not run.stalled, f"{run.stalled}; {len(problems)} problems:\n{shown}"
    assert not problems, f"{len(problems)} problems:\n{shown}"


def test_a_callback_with_options_of_the_wrong_type_is_refused_before_applying(
    broker_url: str, worker_process: WorkerProcess, clean_database: str
) -> None:
    # On the suite's own worker: its log would be the corpus's otherwise (Celery's tracer
    # logs the error without the task id).
    client = redis.Redis.from_url(broker_url)
    tok = f"callback-{uuid.uuid4().hex[:8]}"
    message = envelope(tok)
    message["body"] = b64(json.dumps([[], {"data": {"name": tok}}, {"callbacks": [
        {"task": "tags.create", "options": {"countdown": "x"}}]}]))
    client.lpush(QUEUE, dump(message))
    deadline = time.monotonic() + 30
    while not client.exists(f"celery-task-meta-{tok}-id"):
        assert time.monotonic() < deadline, "no outcome"
        time.sleep(0.05)
    time.sleep(0.5)  # its dead letter, if any, commits before its result is stored
    assert [letter["reason"] for letter in read_letters(clean_database)] == [INVALID]
    assert f"{tok}-id" not in read_ledger(clean_database)


def test_every_outcome_is_told_in_a_task_event(run: Run) -> None:
    told: dict[str, set[str]] = {}
    for event in run.events:
        if "uuid" in event:
            told.setdefault(event["uuid"], set()).add(event["type"])
    kinds = {SUCCESS: "task-succeeded", FAILURE: "task-failed", "REVOKED": "task-revoked"}
    missing = [f"{case.name}: no {kinds[case.result]}" for case in run.corpus.cases
               if case.result and not case.known
               and kinds[case.result] not in told.get(case.task_id or "", ())]
    assert not missing, "\n".join(missing)


def test_nothing_is_left_in_redis(run: Run) -> None:
    assert not any(run.leftovers.values()), run.leftovers


def test_the_node_applies_fresh_commands_and_again_after_a_restart(run: Run) -> None:
    assert all(run.fresh.values()), run.fresh
    for log in run.logs:
        assert "Unrecoverable error" not in log


def log_records(log: str) -> list[str]:
    """A Celery log's records, each with the lines that follow it (its traceback)."""
    starts = [match.start() for match in LOG_RECORD.finditer(log)] + [len(log)]
    return [log[start:end] for start, end in itertools.pairwise(starts)]


def test_nothing_went_wrong_in_the_worker(run: Run) -> None:
    """No error, no batch fell back to one-by-one, no process was lost, nothing put back
    (but for the known bugs' own cases)."""
    known = [case.token for case in run.corpus.cases if case.known]
    wrong = [record for log in run.logs for record in log_records(log)
             if any(sign in record for sign in ("Traceback", "ERROR/", "CRITICAL/",
                                                  "goes back on the queue", "one by one",
                                                  "were put back"))
             and not any(token in record for token in known)]
    assert not wrong, "\n".join(record[:500] for record in wrong[:10])


def needles(secret: str) -> set[bytes]:
    """`secret` as a reader could find it: as itself, escaped, or base64-encoded."""
    forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
             repr(secret)[1:-1], ascii(secret)[1:-1], quote(secret, safe=""),
             quote_plus(secret)}
    forms |= {json.dumps(form)[1:-1] for form in list(forms)}
    found = set()
    for form in forms:
        data = form.encode("utf-8", "surrogatepass")
        found.add(data)
        for offset in range(3):
            encoded = base64.b64encode(b"\0" * offset + data)
            start = -(-8 * offset // 6)
            end = 8 * (offset + len(data)) // 6
            found.add(encoded[start:end])
    return {needle for needle in found if len(needle) >= 6}


def test_no_secret_of_the_corpus_can_be_read_anywhere(run: Run) -> None:
    places: dict[str, list[bytes]] = {
        "the worker's log": [log.encode("utf-8", "surrogateescape") for log in run.logs],
        "Redis": run.redis_dump,
        "task events": [json.dumps(event, default=str).encode() for event in run.events]
        + [json.dumps(event, default=str, ensure_ascii=False).encode("utf-8", "surrogatepass")
           for event in run.events],
        "everything published": [channel + b" " + data for channel, data in run.published],
        "dead-letters list --json": [run.cli["list"].encode()],
        "dead-letters show --json": [run.cli["show"].encode(), run.cli["show one"].encode()],
    }
    for table, rows in run.tables.items():
        places[f"table {table}"] = [row.encode("utf-8", "surrogatepass") for row in rows]
    assert run.events and run.published and run.cli["list"], "nothing was captured"
    joined = {place: b"\n".join(texts) for place, texts in places.items()}
    leaks = []
    for secret in run.corpus.secrets:
        for needle in needles(secret):
            for place, haystack in joined.items():
                if needle in haystack:
                    owner = run.corpus.cases[run.corpus.owners[secret]].name
                    leaks.append(f"{owner!r}: {secret!r} as {needle!r} in {place}")
    assert not leaks, f"{len(leaks)} leaks:\n" + "\n".join(leaks[:40])


def test_the_command_line_shows_every_dead_letter(run: Run) -> None:
    listed = [json.loads(line) for line in run.cli["list"].splitlines() if line.strip()]
    shown = [json.loads(line) for line in run.cli["show"].splitlines() if line.strip()]
    assert [letter["id"] for letter in listed] == [letter["id"] for letter in run.letters]
    assert [letter["id"] for letter in shown] == [letter["id"] for letter in run.letters][:500]
    assert json.loads(run.cli["show one"]) == shown[0]
    for letter in shown:
        assert "password_hash" not in letter


def test_the_corpus_took_little_time(run: Run) -> None:
    # A poison message would hold its batch hostage until the visibility timeout (20 s).
    assert run.elapsed < 15, f"the corpus took {run.elapsed:.1f} s"


def test_the_corpus_covers_every_kind_of_the_issue(run: Run) -> None:
    corpus = run.corpus
    names = {case.name for case in corpus.cases}
    for kind in ("body ''", "body 'hello'", "body {} (not text)", "body null", "body [1]",
                 "body of two elements", "headers null", "timelimit 'x'",
                 "kwargs nested 480 deep", "body 0x10", "tag name NaN (utf-8 body)",
                 "tag name Infinity (utf-8 body)", "tag name 1e400 (utf-8 body)",
                 "tag name a lone surrogate (utf-8 body)", "a lone surrogate in a key",
                 "a top-level password kwarg", "kwargs nested 900 deep",
                 "NUL inside password_hash", "zlib bomb (100 MB inside, application/x-gzip)",
                 "'Password' in data", "'password' as a kwarg", "data as a JSON string",
                 "data as a list",
                 "a positional password", "unknown task, stock Celery kwargsrepr", "pickle",
                 "yaml", "users.create, compact headers", "data.password_hash",
                 "id null, no command_id", "over the size limit, headers last",
                 "the command_id again on another task", "identical raw bytes twice"):
        assert kind in names, kind
    assert len(names) == len(corpus.cases), "two cases share a name"
