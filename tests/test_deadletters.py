"""Dead letters can always be stored, and never hold a secret: against real PostgreSQL."""

from __future__ import annotations

import base64
import gzip
import json
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DataError, IntegrityError

from worker import db, deadletters
from worker.deadletters import RAW_TEXT_LIMIT, jsonable, raw_evidence
from worker.protocol import encode
from worker.security import NESTED_TOO_DEEPLY, REDACTED

SECRET = "hunter2-dead-letter-secret"


def rows(url: str, sql: str) -> list[Any]:
    engine = create_engine(url)
    with engine.connect() as connection:
        found = list(connection.execute(text(sql)))
    engine.dispose()
    return found


def nested(depth: int, leaf: Any) -> Any:
    """`leaf` inside `depth` levels of objects and lists, alternately."""
    value = leaf
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


# Each of these is refused by jsonb as it comes from a JSON decoder (SQLSTATE 22P02, 22P05)
# or cannot even be encoded by the driver.
HOSTILE: dict[str, Any] = {
    "nan": json.loads('{"v": NaN}'),
    "infinity": json.loads('{"v": Infinity, "w": -Infinity}'),
    "1e400": json.loads('{"v": 1e400}'),
    "surrogate value": json.loads('{"v": "\\ud800"}'),
    "surrogate key": json.loads('{"\\udfff": 1, "data": {"a\\ud800b": "c"}}'),
    "nul": {"v": "a\x00b", "k\x00": 1},
    "nul in password_hash": {"data": {"password_hash": "$argon2id$\x00"}},
    "huge int": {"v": 10**1000, "w": -(10**3000)},
    "int beyond decimal text": {"v": 2**20_000},
    "900 deep": nested(900, SECRET),
    "not json at all": {"v": b"bytes", "w": {1, 2}, "x": object(), 7: "int key"},
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_value_jsonb_refuses_is_stored_after_sanitizing(clean_database: str,
                                                          name: str) -> None:
    with db.transaction() as session:
        letter_id = deadletters.record(session, reason="invalid", error="invalid: test",
                                       task="tags.create", kwargs=HOSTILE[name])
    ((kwargs,),) = rows(clean_database, f"SELECT kwargs FROM dead_letters WHERE id = {letter_id}")
    assert kwargs is not None
    assert SECRET not in json.dumps(kwargs)


def test_postgres_refuses_what_the_sanitizer_turns_into_text(clean_database: str) -> None:
    """The proof that the sanitizer is needed: jsonb itself refuses these as JSON text."""
    engine = create_engine(clean_database)
    try:
        for raw in ('{"v": NaN}', '{"v": Infinity}', '{"v": "\\u0000"}', '{"v": "\\ud800"}'):
            with pytest.raises(DataError), engine.connect() as connection:
                connection.execute(text("SELECT CAST(:v AS jsonb)"), {"v": raw})
    finally:
        engine.dispose()


def test_the_sanitizer_keeps_what_it_can_and_says_what_it_changed() -> None:
    sanitized = jsonable({"nan": float("nan"), "inf": float("inf"), "neg": float("-inf"),
                          "s": "a\ud800\x00", "\ud800": 1, "t": (1, 2), "n": 10**50,
                          "ok": [1.5, True, None]})
    assert sanitized == {"nan": "NaN", "inf": "Infinity", "neg": "-Infinity",
                         "s": "a\\ud800\\u0000", "\\ud800": 1, "t": [1, 2], "n": 10**50,
                         "ok": [1.5, True, None]}
    assert NESTED_TOO_DEEPLY in json.dumps(jsonable(nested(900, 1)))


def test_a_huge_integer_round_trips_through_jsonb(clean_database: str) -> None:
    with db.transaction() as session:
        deadletters.record(session, reason="invalid", error="invalid: big",
                           kwargs={"id": 10**1000})
    ((kwargs,),) = rows(clean_database, "SELECT kwargs FROM dead_letters")
    assert kwargs == {"id": 10**1000}


def test_over_long_ids_names_and_errors_are_cut_after_escaping(clean_database: str) -> None:
    with db.transaction() as session:
        deadletters.record(session, reason="unknown_command", error="\x00" * 10_000,
                           command_id="\x00" * 128, task="\ud800" * 300)
    ((command_id, task, error),) = rows(clean_database,
                                        "SELECT command_id, task, error FROM dead_letters")
    assert len(command_id) == 128 and command_id.startswith("\\u0000")
    assert len(task) == 200 and len(error) == 4000


def test_secrets_are_redacted_at_any_depth_and_the_hash_has_its_own_column(
    clean_database: str,
) -> None:
    hashed = "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
    kwargs = {"password": SECRET, "data": {"Password": SECRET, "profile": [{"token": SECRET}],
                                           "note": json.dumps({"password": SECRET})}}
    with db.transaction() as session:
        letter_id = deadletters.record(session, reason="conflict", error="conflict: x",
                                       task="users.create", kwargs=kwargs,
                                       args=["ada", SECRET], password_hash=hashed)
        letter = deadletters.get(session, letter_id)
        assert letter is not None
        shown = deadletters.to_dict(letter)
        detail = deadletters.to_detail(letter)
    ((stored_kwargs, stored_hash),) = rows(clean_database,
                                           "SELECT kwargs, password_hash FROM dead_letters")
    assert SECRET not in json.dumps(stored_kwargs)
    assert stored_kwargs["data"]["Password"] == REDACTED
    assert stored_kwargs["args"] == [REDACTED, REDACTED]
    assert stored_hash == hashed
    assert hashed not in json.dumps(shown, default=str)
    assert hashed not in json.dumps(detail, default=str)


def test_a_password_hash_that_is_not_argon2id_is_not_kept(clean_database: str) -> None:
    with db.transaction() as session:
        deadletters.record(session, reason="conflict", error="conflict: x",
                           password_hash="plain text")
    assert rows(clean_database, "SELECT password_hash FROM dead_letters") == [(None,)]


@pytest.fixture
def refusing_arguments(clean_database: str) -> Iterator[str]:
    """PostgreSQL refusing every dead letter's arguments as invalid data (SQLSTATE 22P02).

    A stand-in for content the sanitizer did not foresee: a trigger, so the refusal is the
    server's own.
    """
    engine = create_engine(clean_database)
    with engine.begin() as connection:
        connection.execute(text(
            "CREATE FUNCTION refuse_kwargs() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'refused' USING ERRCODE = '22P02'; END $$"))
        connection.execute(text(
            "CREATE TRIGGER refuse_kwargs BEFORE INSERT ON dead_letters FOR EACH ROW "
            "WHEN (NEW.kwargs IS NOT NULL) EXECUTE FUNCTION refuse_kwargs()"))
    try:
        yield clean_database
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TRIGGER refuse_kwargs ON dead_letters"))
            connection.execute(text("DROP FUNCTION refuse_kwargs()"))
        engine.dispose()


def test_a_refused_row_falls_back_to_a_minimal_one_and_the_transaction_goes_on(
    refusing_arguments: str,
) -> None:
    raw = raw_evidence(b"garbage")
    with db.transaction() as session:
        session.execute(text("INSERT INTO tags (name, version) VALUES ('before', 1)"))
        first = deadletters.record(session, reason="undecodable", error="undecodable: x",
                                   command_id="k-1", task="tags.create",
                                   kwargs={"data": {"name": "x"}}, raw=raw)
        second = deadletters.record(session, reason="undecodable", error="undecodable: y",
                                    kwargs={"data": {"name": "y"}})
        session.execute(text("INSERT INTO tags (name, version) VALUES ('after', 1)"))
    assert first != second
    assert rows(refusing_arguments, "SELECT name FROM tags ORDER BY name") == [
        ("after",), ("before",)]
    letters = rows(refusing_arguments, "SELECT command_id, task, reason, error, kwargs, "
                                       "raw_size, raw_sha256 FROM dead_letters ORDER BY id")
    assert [tuple(letter) for letter in letters] == [
        ("k-1", "tags.create", "undecodable", "undecodable: x", None, raw.size, raw.sha256),
        (None, None, "undecodable", "undecodable: y", None, None, None)]


@pytest.mark.parametrize(("deferred", "error"), [
    ("INSERT INTO tags (name, version) VALUES ('once', 1)", IntegrityError),
    # A data error too: it is the caller's statement's, not the dead letter's.
    ("SELECT CAST('not a number' AS int)", DataError),
])
def test_an_error_pending_in_the_caller_s_transaction_is_not_swallowed(
    clean_database: str, deferred: str, error: type[Exception]
) -> None:
    with pytest.raises(error), db.transaction() as session:
        session.execute(text("INSERT INTO tags (name, version) VALUES ('once', 1)"))
        # Travels with the next statement: the dead letter's SAVEPOINT.
        db.defer(session, text(deferred), {})
        deadletters.record(session, reason="invalid", error="invalid: x")
    assert rows(clean_database, "SELECT count(*) FROM dead_letters") == [(0,)]


# --- raw evidence --------------------------------------------------------------------------

def envelope(kwargs: dict[str, Any], **changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(encode("users.explode", kwargs))
    message.update(changes)
    return message


def assert_no_secret(evidence: deadletters.RawEvidence) -> None:
    shown = evidence.text or ""
    for form in (SECRET, base64.b64encode(SECRET.encode()).decode()):
        assert form not in shown


@pytest.mark.parametrize("raw", [
    b"garbage {\"password\": \"" + SECRET.encode() + b"\"",
    pickle.dumps({"password": SECRET}),
    f"data:\n  password: {SECRET}\n".encode(),
    gzip.compress(json.dumps({"password": SECRET}).encode()),
    b"\xff\xfe\x00" + SECRET.encode(),
])
def test_an_item_that_is_not_json_keeps_only_its_size_and_digest(raw: bytes) -> None:
    import hashlib

    evidence = raw_evidence(raw)
    assert evidence == deadletters.RawEvidence(None, len(raw), hashlib.sha256(raw).hexdigest())


def test_an_item_over_the_size_limit_is_not_parsed() -> None:
    raw = json.dumps({"x": "y" * 100}).encode()
    evidence = raw_evidence(raw, limit=50)
    assert evidence.text is None and evidence.size == len(raw) and evidence.sha256


def test_a_base64_body_holding_a_password_is_kept_redacted() -> None:
    message = envelope({"data": {"username": "ada", "password": SECRET}, "command_id": "c-1"})
    evidence = raw_evidence(json.dumps(message).encode())
    assert_no_secret(evidence)
    assert evidence.sha256 is None  # next to a redacted text, a digest could be brute-forced
    assert evidence.text is not None
    kept = json.loads(evidence.text)
    assert kept["body"][1]["data"] == {"username": "ada", "password": REDACTED}
    assert kept["headers"]["task"] == "users.explode"


def test_a_utf8_body_is_kept_as_its_redacted_parse() -> None:
    body = json.dumps([["ada", SECRET], {"data": {"Pass_Word": SECRET, "name": "n"}}, {}])
    message = envelope({}, body=body)
    message["properties"]["body_encoding"] = "utf-8"
    evidence = raw_evidence(json.dumps(message))
    assert_no_secret(evidence)
    assert evidence.text is not None
    kept = json.loads(evidence.text)
    assert kept["body"] == [[REDACTED, REDACTED], {"data": {"Pass_Word": REDACTED,
                                                            "name": "n"}}, {}]


@pytest.mark.parametrize("body", [
    gzip.compress(json.dumps([[], {"password": SECRET}, {}]).encode()),
    pickle.dumps(((), {"data": {"password": SECRET}}, {})),
    f"[[], {{'password': '{SECRET}'}}, {{}}]".encode(),
])
def test_a_body_that_is_compressed_pickled_or_not_json_is_kept_as_its_size_only(
    body: bytes,
) -> None:
    message = envelope({}, body=base64.b64encode(body).decode())
    evidence = raw_evidence(json.dumps(message).encode())
    assert_no_secret(evidence)
    assert evidence.text is not None
    kept = json.loads(evidence.text)["body"]
    # No digest: with the rest of the message in view, it could be brute-forced.
    assert set(kept) == {"size", "not_kept"} and kept["size"] == len(body)


@pytest.mark.parametrize("body", [
    [["ada", SECRET]],  # args only
    [[], {}, {}, ["ada", SECRET]],  # more than [args, kwargs, embed]
    {"task": "users.create", "id": "p1", "args": ["ada", SECRET], "kwargs": {}},  # protocol 1
    SECRET,  # a bare string
])
@pytest.mark.parametrize("serialized", [True, False])
def test_a_body_of_any_shape_keeps_no_positional_secret(body: Any, serialized: bool) -> None:
    message = envelope({})
    message["body"] = json.dumps(body) if serialized else body
    message["properties"]["body_encoding"] = "utf-8"
    assert_no_secret(raw_evidence(json.dumps(message).encode()))


def test_a_bare_body_on_the_queue_keeps_no_positional_secret() -> None:
    evidence = raw_evidence(json.dumps([["ada", SECRET], {"note": "n"}, {}]).encode())
    assert_no_secret(evidence)
    assert evidence.text is not None and json.loads(evidence.text)[1] == {"note": "n"}


def test_a_task_name_carrying_a_secret_is_not_kept(clean_database: str) -> None:
    with db.transaction() as session:
        deadletters.record(session, reason="unknown_command", error="unknown_command: x",
                           task=json.dumps({"password": SECRET}))
        deadletters.record(session, reason="unknown_command", error="unknown_command: x",
                           task="tags.nul\x00")
    names = [row[0] for row in rows(clean_database, "SELECT task FROM dead_letters ORDER BY id")]
    assert names == [REDACTED, "tags.nul\\x00"]


def test_producer_reprs_in_the_headers_are_redacted() -> None:
    message = envelope({})
    message["headers"]["kwargsrepr"] = f"{{'data': {{'password': '{SECRET}'}}}}"
    message["headers"]["argsrepr"] = f"('ada', '{SECRET}')"
    evidence = raw_evidence(json.dumps(message).encode())
    assert_no_secret(evidence)
    assert evidence.text is not None
    headers = json.loads(evidence.text)["headers"]
    assert headers["kwargsrepr"] == REDACTED and headers["argsrepr"] == REDACTED


def test_an_envelope_nested_900_deep_is_kept_capped_and_redacted() -> None:
    message = json.dumps(envelope({}))
    # Written out: the standard library's encoder would recurse 900 levels deep.
    deep = '{"k": [' * 450 + json.dumps({"password": SECRET}) + "]}" * 450
    raw = message[:-1] + ', "deep": ' + deep + "}"
    evidence = raw_evidence(raw.encode())
    assert_no_secret(evidence)
    assert evidence.text is not None and NESTED_TOO_DEEPLY in evidence.text


def test_raw_evidence_text_is_capped_and_storable(clean_database: str) -> None:
    message = envelope({}, padding="\ud800\x00" + "x" * 200_000)
    evidence = raw_evidence(json.dumps(message).encode())
    assert evidence.text is not None and len(evidence.text) <= RAW_TEXT_LIMIT
    with db.transaction() as session:
        deadletters.record(session, reason="undecodable", error="undecodable: x", raw=evidence)
    ((kept,),) = rows(clean_database, "SELECT raw_body FROM dead_letters")
    assert kept == evidence.text
