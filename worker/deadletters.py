"""Dead letters: rejected and undeliverable commands, always storable and without secrets.

What a dead letter keeps:

- `kwargs`: the keyword arguments as `security.redact` shows them (every value under a key
  named like a secret is "[redacted]", at any depth), positional arguments under "args"
  (`security.redact_args`), then made storable as PostgreSQL `jsonb` (`jsonable`).
- `password_hash`: the argon2id hash of the command's password, in its own column, so that
  a replay applies the command as first sent; never in `kwargs`, never shown.
- For a queue item that never became a command (undecodable, unknown task, over the size
  limit), `raw_evidence`: its redacted text when it is JSON, else only its size and digest.

`record` never fails because of what a message holds: everything is sanitized first, and
what PostgreSQL still refuses is recorded as a smaller row.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from worker.config import get_settings
from worker.models import DeadLetter
from worker.protocol import loads
from worker.schemas import timestamp
from worker.security import (
    MAX_DEPTH,
    NESTED_TOO_DEEPLY,
    REDACTED,
    is_password_hash,
    printable,
    redact,
    redact_args,
    safe_repr,
)

logger = logging.getLogger(__name__)

RAW_TEXT_LIMIT = 64 * 1024
ERROR_LIMIT = 4000
COMMAND_ID_LIMIT = 128
TASK_LIMIT = 200
# Integers up to this many bits are kept as numbers (jsonb's numeric holds any of them);
# larger ones as text: Python will not even write one of more than 4,300 digits as decimal.
MAX_INTEGER_BITS = 13_000


# --- what jsonb accepts ------------------------------------------------------------------

def storable_text(text: str) -> str:
    """`text` as PostgreSQL text and jsonb accept it: NUL and unpaired surrogates escaped.

    They become the six characters `\\u0000` and `\\ud800`, readable, never raw.
    """
    if "\x00" not in text:
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
    escaped = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return escaped.replace("\x00", "\\u0000")


def _number(value: int | float) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            # JSON's 1e400 reads as infinity too.
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, bool) or value.bit_length() <= MAX_INTEGER_BITS:
        return value
    return f"[integer of {value.bit_length()} bits]"


def jsonable(value: Any) -> Any:
    """`value` as PostgreSQL `jsonb` stores it, whatever a JSON decoder (or Python) made of it.

    Non-finite floats (NaN, Infinity, 1e400) become strings, NUL and unpaired surrogates are
    escaped in strings and keys, keys that are not strings become strings, tuples lists,
    other objects a short repr, and nesting beyond MAX_DEPTH a marker. Never raises.
    """
    try:
        root: list[Any] = [None]
        pending: list[tuple[Any, Any, Any, int]] = [(value, root, 0, 0)]
        while pending:
            item, parent, slot, depth = pending.pop()
            if item is None or isinstance(item, bool):
                parent[slot] = item
            elif isinstance(item, int | float):
                parent[slot] = _number(item)
            elif isinstance(item, str):
                parent[slot] = storable_text(item)
            elif isinstance(item, Mapping | list | tuple) and depth >= MAX_DEPTH:
                parent[slot] = NESTED_TOO_DEEPLY
            elif isinstance(item, Mapping):
                copy: dict[str, Any] = {}
                parent[slot] = copy
                for key, child in list(item.items()):
                    name = storable_text(key if isinstance(key, str) else safe_repr(key, 200))
                    copy[name] = None
                    pending.append((child, copy, name, depth + 1))
            elif isinstance(item, list | tuple):
                elements: list[Any] = [None] * len(item)
                parent[slot] = elements
                for index, child in enumerate(item):
                    pending.append((child, elements, index, depth + 1))
            else:
                parent[slot] = storable_text(safe_repr(item, 200))
        return root[0]
    except Exception:
        return None


def _json_text(value: Any) -> str:
    """Compact JSON of a `jsonable` value, as text PostgreSQL stores."""
    return storable_text(json.dumps(value, ensure_ascii=False, allow_nan=False,
                                    separators=(",", ":")))


# --- raw queue items -----------------------------------------------------------------------

@dataclass(frozen=True)
class RawEvidence:
    """What a dead letter keeps of a queue item that never became a command.

    `text` is the item's JSON with every secret redacted (see `raw_evidence`), or None when
    it is not JSON; `sha256` is the hex digest of the item's bytes, kept only when no text
    is. Next to a text, no digest is kept, of the item or of its body: with the rest of the
    message in view, a digest would let anyone who guesses the rest try passwords offline at
    the speed of SHA-256 (the argon2id that guards stored passwords would not apply).
    """

    text: str | None
    size: int
    sha256: str | None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _opaque(data: bytes, why: str) -> dict[str, Any]:
    """A body kept only as its size (see RawEvidence on why no digest), and why."""
    return {"size": len(data), "not_kept": why}


def _shown_body(parsed: Any) -> Any:
    """A parsed body (or a queue item that is no envelope) with its secrets redacted.

    Positional arguments have no names to go by: Celery's are the first element of a list
    body (`[args, kwargs, embed]`) and a protocol-1 body's `args`; they are redacted as
    such, and so are a list's elements past the third and a bare string, whose meaning
    nothing tells.
    """
    if isinstance(parsed, list):
        return [redact_args(part) if index == 0 or index > 2 else redact(part)
                for index, part in enumerate(parsed)]
    if isinstance(parsed, Mapping):
        shown = redact(parsed)
        if isinstance(shown, dict) and "args" in parsed:
            shown["args"] = redact_args(parsed["args"])
        return shown
    return redact_args(parsed)


def _decoded_body(body: Any, envelope: Mapping[str, Any]) -> Any:
    """An envelope's `body` as evidence: its redacted parse when it is plain JSON, else opaque.

    A base64 body is decoded first; a compressed one (a `compression` header), one in
    another content encoding, or one that is not JSON is kept only as its size.
    """
    if not isinstance(body, str):
        return _shown_body(body)
    properties = envelope.get("properties")
    headers = envelope.get("headers")
    data = body.encode("utf-8", "surrogatepass")
    if isinstance(properties, Mapping) and properties.get("body_encoding") == "base64":
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return _opaque(data, "not base64")
    if isinstance(headers, Mapping) and headers.get("compression"):
        return _opaque(data, "compressed")
    encoding = envelope.get("content-encoding")
    if encoding is not None and str(encoding).lower() not in ("utf-8", "utf8"):
        return _opaque(data, "not utf-8")
    try:
        parsed = loads(data)
    except Exception:  # not JSON (a pickle, a repr, yaml...), or not UTF-8
        return _opaque(data, "not JSON")
    return _shown_body(parsed)


def _evidence_value(parsed: Any) -> Any:
    """A parsed queue item with every secret redacted and its body decoded or made opaque."""
    if not isinstance(parsed, Mapping):
        return _shown_body(parsed)  # a body pushed without its envelope, say
    shown = redact({key: value for key, value in parsed.items() if key != "body"})
    if "body" in parsed:
        shown["body"] = _decoded_body(parsed["body"], parsed)
    headers = shown.get("headers")
    if isinstance(headers, dict):
        # Producers' own reprs of the arguments, in plain text (Celery's are single-quoted
        # Python): never trusted, never kept.
        for name in ("argsrepr", "kwargsrepr"):
            if headers.get(name) is not None:
                headers[name] = REDACTED
    return shown


def raw_evidence(raw: bytes | bytearray | str, limit: int | None = None) -> RawEvidence:
    """What a dead letter may keep of a raw queue item: never a secret, never raises.

    Over `limit` bytes (MAX_PAYLOAD_BYTES by default) or not JSON (garbage, a pickle, yaml,
    gzip...): no text, its size and sha256. JSON: the text of the parsed item with every
    secret redacted, its `body` replaced by the body's redacted parse when that is UTF-8
    JSON (base64 decoded first) or by its size otherwise, and the producer's
    `argsrepr`/`kwargsrepr` headers redacted; cut to RAW_TEXT_LIMIT characters; its size,
    no digest.
    """
    try:
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    except Exception:
        data = b""
    size = len(data)
    try:
        if limit is None:
            limit = get_settings().max_payload_bytes
        if size > limit:
            return RawEvidence(None, size, _digest(data))
        try:
            parsed = loads(data)
        except Exception:
            return RawEvidence(None, size, _digest(data))
        text = _json_text(jsonable(_evidence_value(parsed)))
        return RawEvidence(text[:RAW_TEXT_LIMIT], size, None)
    except Exception:
        return RawEvidence(None, size, _digest(data))


# --- recording -----------------------------------------------------------------------------

def _cut(text: str | None, limit: int) -> str | None:
    # Escaped first, then cut: escaping lengthens the text (one NUL is six characters).
    return None if text is None else storable_text(str(text)[:limit])[:limit]


def kept_arguments(kwargs: Any, args: Any = None,
                   password_hash: str | None = None) -> dict[str, Any] | None:
    """The arguments as a dead letter keeps them: redacted, storable, an object or None.

    With a `password_hash`, `data.password` shows as redacted even when the command carried
    the hash instead (a replay): the dead letter says a password was given.
    """
    kept = redact(kwargs)
    if kept is not None and not isinstance(kept, dict):
        kept = {"kwargs": kept}
    data = kept.get("data") if isinstance(kept, dict) else None
    if password_hash is not None and isinstance(data, dict):
        data.setdefault("password", REDACTED)
    if args:
        kept = {"args": redact_args(args), **(kept or {})}
    stored = jsonable(kept)
    return stored if isinstance(stored, dict) else None


def _refused_content(error: sa_exc.DBAPIError) -> bool:
    """Whether PostgreSQL refused the row for what it holds (SQLSTATE class 22, data)."""
    sqlstate = getattr(error.orig, "pgcode", None)
    return isinstance(error, sa_exc.DataError) or (sqlstate or "").startswith("22")


def record(
    session: Session,
    *,
    reason: str,
    error: str,
    command_id: str | None = None,
    task: str | None = None,
    kwargs: Any = None,
    args: Any = None,
    password_hash: str | None = None,
    raw: RawEvidence | None = None,
) -> int:
    """Insert a dead letter inside the caller's transaction and return its id.

    `kwargs` and `args` are redacted and sanitized here; `password_hash` is kept only if it
    is an argon2id hash; over-long ids, task names and errors are cut to fit. Should
    PostgreSQL still refuse the row for its content, a smaller one is recorded in its place
    (no arguments, then nothing but the reason), each within a SAVEPOINT: the caller's
    transaction stays usable. Errors that are not about content (a lost connection) raise.
    """
    base: dict[str, Any] = {
        "reason": reason,
        "error": _cut(error, ERROR_LIMIT) or "",
        "command_id": _cut(command_id, COMMAND_ID_LIMIT),
        # The name as sent when it is a name; escaped, or redacted if it carries a secret.
        "task": _cut(printable(task, TASK_LIMIT), TASK_LIMIT) if task is not None else None,
        "raw_size": raw.size if raw is not None else None,
        "raw_sha256": raw.sha256 if raw is not None else None,
    }
    if not is_password_hash(password_hash):
        password_hash = None
    attempts: list[dict[str, Any]] = [
        {**base, "kwargs": kept_arguments(kwargs, args, password_hash),
         "password_hash": password_hash,
         "raw_body": raw.text if raw is not None else None},
        base,
        {"reason": reason, "error": f"{reason}: (the details could not be stored)"},
    ]
    for number, values in enumerate(attempts):
        savepoint = session.begin_nested()
        # SAVEPOINT is sent now, not with the INSERT, and anything deferred in the caller's
        # transaction (worker/db.py) travels with it, outside the `try`: its errors are the
        # caller's, not this row's.
        session.connection()
        try:
            letter = DeadLetter(**values)
            session.add(letter)
            session.flush()
        except sa_exc.DBAPIError as refused:
            savepoint.rollback()
            if not _refused_content(refused) or number == len(attempts) - 1:
                raise
            logger.warning("a dead letter (%s) was refused for its content (SQLSTATE %s); "
                           "recording less of it", reason, getattr(refused.orig, "pgcode", None))
            continue
        savepoint.commit()
        return letter.id
    raise AssertionError("unreachable: the last attempt returns or raises")


def get(session: Session, letter_id: int) -> DeadLetter | None:
    """The dead letter with `letter_id`."""
    return session.get(DeadLetter, letter_id)


def list_(
    session: Session,
    *,
    reason: str | None = None,
    task: str | None = None,
    command_id: str | None = None,
    limit: int | None = None,
) -> Sequence[DeadLetter]:
    """Dead letters matching the filters, oldest first."""
    statement = select(DeadLetter).order_by(DeadLetter.id)
    if reason is not None:
        statement = statement.where(DeadLetter.reason == reason)
    if task is not None:
        statement = statement.where(DeadLetter.task == task)
    if command_id is not None:
        statement = statement.where(DeadLetter.command_id == command_id)
    if limit is not None:
        statement = statement.limit(limit)
    return session.scalars(statement).all()


def discard(session: Session, letter_id: int) -> bool:
    """Delete a dead letter; whether it existed."""
    deleted = session.execute(delete(DeadLetter).where(DeadLetter.id == letter_id))
    return bool(deleted.rowcount)  # type: ignore[attr-defined]


def to_dict(letter: DeadLetter) -> dict[str, Any]:
    """The dead letter as JSON-ready data: no password hash (kwargs hold no secrets)."""
    return {
        "id": letter.id,
        "command_id": letter.command_id,
        "task": letter.task,
        "reason": letter.reason,
        "error": letter.error,
        "kwargs": letter.kwargs,
        "received_at": timestamp(letter.received_at),
    }


def to_detail(letter: DeadLetter) -> dict[str, Any]:
    """`to_dict` and what is kept of the raw item (`dead-letters show`); still no hash."""
    return {**to_dict(letter), "raw_body": letter.raw_body, "raw_size": letter.raw_size,
            "raw_sha256": letter.raw_sha256}
