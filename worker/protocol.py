"""Celery protocol-2 messages as kombu's Redis transport stores them: encode and decode.

Decoding is total: whatever bytes a queue item holds, `decode` returns a `Message` or raises
`UndecodableMessage` with a reason that never quotes the input, and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import json
import lzma
import math
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from worker.security import printable, safe_repr

JSON = "application/json"
#: Nesting deeper than this in args or kwargs is refused (`invalid`): no command needs more
#: than a few levels, and every later step (validation, repr, storage) walks the value.
MAX_DEPTH = 32

# kombu's compression names (`kombu.compression`) and the decompressors that honour a limit.
_DECOMPRESSORS: dict[str, Callable[[], Any]] = {
    "application/x-gzip": lambda: zlib.decompressobj(),
    "zlib": lambda: zlib.decompressobj(),
    "application/x-bz2": lambda: bz2.BZ2Decompressor(),
    "bzip2": lambda: bz2.BZ2Decompressor(),
    "application/x-lzma": lambda: lzma.LZMADecompressor(),
    "lzma": lambda: lzma.LZMADecompressor(),
}


def encode(
    task: str,
    kwargs: dict[str, Any],
    *,
    queue: str = "commands",
    task_id: str | None = None,
    args: list[Any] | None = None,
    headers: dict[str, Any] | None = None,
    embed: dict[str, Any] | None = None,
    priority: int = 0,
) -> bytes:
    """A message as `send_task` would put it on the queue list (secrets left out of reprs)."""
    task_id = task_id or str(uuid.uuid4())
    body = json.dumps([args or [], kwargs, embed or {"callbacks": None, "errbacks": None,
                                                      "chain": None, "chord": None}])
    envelope = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": JSON,
        "headers": {
            "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": safe_repr(args or [], positional=True),
            "kwargsrepr": safe_repr(kwargs),
            "origin": "worker.protocol", "ignore_result": False, **(headers or {}),
        },
        "properties": {
            "correlation_id": task_id, "reply_to": None, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": priority,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope).encode()


def loads(raw: bytes | str) -> Any:
    """JSON `raw` as the standard library reads it; orjson's parser first, for speed.

    orjson refuses some JSON that the standard library reads (NaN, integers beyond 64 bits,
    lone surrogates): those take the slow path, so what a message means never depends on it.
    Raises ValueError for anything that is not JSON in UTF-8, however deeply nested.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            # UTF-8 only, as JSON is exchanged (RFC 8259) and kombu reads it: the standard
            # library would take bytes in UTF-16 or UTF-32, or after a byte order mark.
            return json.loads(raw if isinstance(raw, str) else bytes(raw).decode("utf-8"))
        except RecursionError:
            # Nested deeper than the interpreter's stack: not a message, whatever it is.
            raise ValueError("JSON nested too deeply") from None
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None


_WHITESPACE = str.maketrans("", "", " \t\r\n")


class UndecodableMessage(ValueError):
    """A queue item that is not a JSON Celery protocol-2 message (the reason never quotes it)."""


@dataclass(frozen=True)
class Message:
    """A decoded command message."""

    task_id: str | None
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    properties: dict[str, Any]
    #: The body's third element: callbacks, errbacks, chain and chord (canvas).
    embed: dict[str, Any] = field(default_factory=dict)
    #: At most how deeply the body nests (its count of opening brackets, strings included):
    #: most bodies are known to be shallow without walking them.
    nesting_bound: int = 0


def _decompress(body: bytes, method: str, limit: int) -> bytes:
    factory = _DECOMPRESSORS.get(method)
    if factory is None:
        raise UndecodableMessage(f"compression {printable(method)!r} is not accepted")
    decompressor = factory()
    try:
        # Never more than the size limit out of it, however small the input: no bomb gets in.
        out: bytes = decompressor.decompress(body, limit + 1)
    except (OSError, ValueError, EOFError, lzma.LZMAError, zlib.error):
        raise UndecodableMessage("the compressed body is corrupt") from None
    if len(out) > limit:
        raise OverLimit(f"its body decompresses to more than the limit of {limit} bytes")
    if not getattr(decompressor, "eof", True):
        raise UndecodableMessage("the compressed body is truncated")
    return out


class OverLimit(UndecodableMessage):
    """A message over the size limit once decompressed (a rejection of its own: `invalid`)."""


def decode(raw: bytes, limit: int = 1 << 20) -> Message:
    """The message in `raw`, or `UndecodableMessage` saying why it is not one (never unpickles).

    `limit` bounds the body once decoded and decompressed (an `OverLimit` beyond it).
    """
    try:
        envelope = loads(raw)
    except ValueError:
        raise UndecodableMessage("the queue item is not JSON") from None
    if not isinstance(envelope, dict):
        raise UndecodableMessage("the queue item is not a JSON object")
    content_type = envelope.get("content-type")
    if content_type != JSON:
        raise UndecodableMessage(f"content type {printable(content_type)!r} is not accepted "
                                 "(only application/json)")
    headers, properties = envelope.get("headers"), envelope.get("properties")
    if not isinstance(headers, dict) or not isinstance(properties, dict):
        raise UndecodableMessage("the envelope's headers and properties must be objects")
    task = headers.get("task")
    if not isinstance(task, str):
        raise UndecodableMessage("not a Celery protocol-2 message (no task header)")
    body = envelope.get("body")
    if not isinstance(body, str):
        raise UndecodableMessage("the body is not a string")
    encoding = properties.get("body_encoding")
    try:
        if encoding == "base64":
            try:
                data = base64.b64decode(body, validate=True)
            except binascii.Error:
                # Line breaks and spaces are kept out of the alphabet, as kombu's reader does
                # (the `base64` tool wraps at 76 columns); any other character outside it is
                # refused. Only then: removing them costs three times the decoding itself.
                data = base64.b64decode(body.translate(_WHITESPACE), validate=True)
        elif encoding in (None, "utf-8", "utf8"):
            data = body.encode("utf-8", errors="surrogatepass")
        else:
            raise UndecodableMessage("body encoding is not base64 or utf-8")
    except (binascii.Error, ValueError) as error:
        if isinstance(error, UndecodableMessage):
            raise
        raise UndecodableMessage("the body is not valid base64") from None
    compression = headers.get("compression")
    if compression is not None:
        if not isinstance(compression, str):
            raise UndecodableMessage("the compression header is not a string")
        data = _decompress(data, compression, limit)
    elif len(data) > limit:
        raise OverLimit(f"its body of {len(data)} bytes exceeds the limit of {limit} bytes")
    try:
        payload = loads(data)
    except ValueError:
        raise UndecodableMessage("the body is not JSON") from None
    if not (isinstance(payload, list) and len(payload) == 3):
        raise UndecodableMessage("the body is not [args, kwargs, embed]")
    args, kwargs, embed = payload
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise UndecodableMessage("args must be a list and kwargs an object")
    if embed is not None and not isinstance(embed, dict):
        raise UndecodableMessage("the body's third element must be an object")
    return Message(task_id=text_id(headers.get("id")), task=task,
                   args=args, kwargs=kwargs, headers=headers, properties=properties,
                   embed=embed or {}, nesting_bound=data.count(b"[") + data.count(b"{"))


def text_id(value: Any) -> str | None:
    """A task id header as the worker can use it: text that UTF-8 can encode, else None.

    JSON can carry an unpaired surrogate ("\\ud800"), which no Redis key, result or event
    can hold: such an id is no task id at all, as a number or a list would not be.
    """
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def _time(value: Any) -> bool:
    try:
        parse_time(value)
    except (ValueError, TypeError):
        return False
    return True


# The options Celery computes with when it publishes a callback, a chain's next step or a
# chord's body (`Signature.apply_async` -> `app.send_task`), and what each must be: one of
# the wrong type fails there, after the command has committed.
_OPTION_CHECKS: dict[str, Callable[[Any], bool]] = {
    "countdown": _number,
    "eta": lambda value: isinstance(value, str) and _time(value),
    "expires": lambda value: _number(value) or (isinstance(value, str) and _time(value)),
    "priority": lambda value: isinstance(value, int) and not isinstance(value, bool)
    and 0 <= value <= 255,
    "time_limit": _number,
    "soft_time_limit": _number,
    "task_id": lambda value: text_id(value) is not None,
    "queue": lambda value: isinstance(value, str | dict),
    "routing_key": lambda value: isinstance(value, str),
    "exchange": lambda value: isinstance(value, str | dict),
    "headers": lambda value: isinstance(value, dict),
    "retry": lambda value: isinstance(value, bool),
    "retry_policy": lambda value: isinstance(value, dict),
    "ignore_result": lambda value: isinstance(value, bool),
    "immutable": lambda value: isinstance(value, bool),
    "link": lambda value: isinstance(value, list | dict),
    "link_error": lambda value: isinstance(value, list | dict),
}


def _options_fit(options: Any) -> bool:
    if options is None:
        return True
    if not isinstance(options, dict):
        return False
    for name, check in _OPTION_CHECKS.items():
        value = options.get(name)
        if value is not None and not check(value):
            return False
    return True


def _signature(value: Any) -> bool:
    """Whether `value` has the shape of a Celery signature (as `Signature.from_dict` reads),
    with options Celery can publish it with."""
    return (isinstance(value, dict) and isinstance(value.get("task"), str)
            and isinstance(value.get("args", ()), list | tuple | None)
            and isinstance(value.get("kwargs", {}), dict | None)
            and _options_fit(value.get("options", {}))
            and all(_signature(inner) for inner in _nested_signatures(value)))


def _nested_signatures(value: dict[str, Any]) -> list[Any]:
    """Signatures inside a signature: a group's or chain's tasks, a chord's body, links."""
    inner: list[Any] = []
    kwargs = value.get("kwargs") or {}
    if isinstance(kwargs, dict):
        for name in ("tasks", "header"):
            tasks = kwargs.get(name)
            if isinstance(tasks, list):
                inner += tasks
            elif isinstance(tasks, dict) and "task" in tasks:
                inner.append(tasks)
        if isinstance(kwargs.get("body"), dict):
            inner.append(kwargs["body"])
    options = value.get("options") or {}
    if isinstance(options, dict):
        for name in ("link", "link_error"):
            links = options.get(name)
            if isinstance(links, dict):
                inner.append(links)
            elif isinstance(links, list):
                inner += links
    return inner


def canvas_problem(embed: dict[str, Any]) -> str | None:
    """What is wrong with a message's canvas (callbacks, errbacks, chain, chord), if anything.

    Celery reads these as signatures only after the task has run: a malformed one would turn
    a committed command into a FAILURE. Found here, the message is refused before that.
    """
    if all(value is None for value in embed.values()):
        return None  # no canvas: what nearly every message carries
    if depth(embed) > 2 * MAX_DEPTH:
        # Real canvases nest a few levels (a chord's body in a chain's step); reading one
        # deeper would recurse past any stack.
        return "the message's canvas is nested too deeply"
    for name in ("callbacks", "errbacks", "chain"):
        value = embed.get(name)
        if value is not None and not (isinstance(value, list)
                                      and all(_signature(item) for item in value)):
            return f"the message's {name} is not a list of signatures"
    if embed.get("chord") is not None and not _signature(embed["chord"]):
        return "the message's chord is not a signature"
    return None


def depth(value: Any) -> int:
    """How deeply `value` nests lists and objects (0 for a scalar); iterative, any depth."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            items: Any = item.values()
        elif isinstance(item, list | tuple):
            items = item
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        stack.extend((child, level) for child in items)
    return deepest


def parse_time(value: Any) -> datetime | None:
    """An `eta` or `expires` header as an aware datetime (naive means UTC); None when absent.

    Raises ValueError for anything that is not an ISO 8601 date and time.
    """
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError("not an ISO 8601 date and time")
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Head:
    """What the node reads of a message before handing it to a pool process (best effort)."""

    task_id: str | None = None
    task: str | None = None
    eta: datetime | None = None
    expires: datetime | None = None
    time_limits: tuple[float | None, float | None] = (None, None)


def _limits(value: Any) -> tuple[float | None, float | None]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None, None
    return tuple(  # type: ignore[return-value]
        float(item) if isinstance(item, int | float) and not isinstance(item, bool)
        and 0 < item < 1e9 else None for item in value)


def head(raw: bytes) -> Head:
    """The task id, name, eta, expiry and time limits of a message, or an empty `Head`.

    Never raises: a message whose headers cannot be read is left for `decode` to refuse.
    """
    try:
        envelope = orjson.loads(raw)
        headers = envelope["headers"]
        task_id, task = headers.get("id"), headers.get("task")
        try:
            eta = parse_time(headers.get("eta"))
        except ValueError:
            eta = None
        try:
            expires = parse_time(headers.get("expires"))
        except ValueError:
            expires = None
        return Head(task_id if isinstance(task_id, str) else None,
                    task if isinstance(task, str) else None, eta, expires,
                    _limits(headers.get("timelimit")))
    except Exception:
        return Head()


def identity(raw: bytes | None, tail: bytes = b"") -> tuple[str | None, str | None]:
    """(task id, task name) of a message that cannot be decoded, as far as they can be read.

    From the envelope when it is JSON; else from `tail`, the end of an over-size item, where
    kombu writes the headers (`{"body": ..., "headers": {...}, "properties": {...}}`).
    """
    candidates: list[bytes] = []
    if raw is not None:
        candidates.append(raw)
    if tail:
        start = tail.rfind(b'"headers"')
        if start != -1:
            candidates.append(b"{" + tail[start:])
    for candidate in candidates:
        try:
            envelope = loads(candidate)
            headers = envelope["headers"]
            task_id, task = headers.get("id"), headers.get("task")
        except Exception:  # noqa: S112 - best effort: the next candidate, or none
            continue
        return text_id(task_id), task if isinstance(task, str) else None
    return None, None
