"""Password hashing (argon2id) and the redaction of secrets from anything that leaves a task.

Redaction goes by rule, not by path: a producer may put a password anywhere (a top-level
keyword argument, under `data` sent as a JSON string, in a list, as `Password`), so every
place that shows arguments (events and so Flower, logs, dead letters, the command line)
passes them through `redact` or `safe_repr`, which look at every key at any depth.

The rule:

- A key is *named like a secret* when, after NFKC normalisation and case folding, with every
  character that is not a letter or digit removed (`_`, `-`, spaces, dots...), it contains
  one of SECRET_WORDS: `password`, `passwd`, `passphrase`, `pwd`, `secret`, `token`, `apikey`,
  `credential`, `privatekey`, `authorization`. So `Password`, `user_password`, `API-Key`,
  `password_hash` and `X-Auth-Token` match; `author_id` and `username` do not (`auth` alone is
  not a word of the list: it would take `author_id` with it). A key that is not a string is
  tested as `str(key)`.
- The value under such a key, whatever it is (a string, a number, a whole object), becomes
  REDACTED.
- A string value that itself *mentions* such a key followed by `:` or `=` (a JSON text
  `{"password": "x"}`, a Python repr `{'password': 'x'}`, `password=x`, YAML) is replaced
  whole: it is an object sent as text, and the worker does not parse text to find out.
  A key that mentions one that way is replaced too (by REDACTED_KEY and a number).
- Positional arguments have no names, so nothing tells a password from a username there:
  `redact_args` replaces every string that is not under a key of an object inside them.
- Nesting beyond MAX_DEPTH levels is replaced by NESTED_TOO_DEEPLY.

Over-redaction (a post whose content says "password: ...") costs only what is shown; it is
the price of never showing one.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from worker.config import get_settings

REDACTED = "[redacted]"
REDACTED_KEY = "[redacted key]"
NESTED_TOO_DEEPLY = "[nested too deeply]"
UNREPRESENTABLE = "[unrepresentable]"
# Deeper than any command's arguments (kwargs.data.tags[0] is 3 levels), shallow enough that
# what is built from a redacted value (repr, JSON, PostgreSQL jsonb) never meets a stack limit.
MAX_DEPTH = 32
SECRET_WORDS = ("password", "passwd", "passphrase", "pwd", "secret", "token", "apikey",
                "credential", "privatekey", "authorization")


@lru_cache(maxsize=1)
def password_hasher() -> PasswordHasher:
    """The argon2id hasher with the configured cost."""
    settings = get_settings()
    return PasswordHasher(
        time_cost=settings.password_hash_time_cost,
        memory_cost=settings.password_hash_memory_kib,
        parallelism=settings.password_hash_parallelism,
    )


def hash_password(password: str) -> str:
    """A salted argon2id hash of `password`."""
    return password_hasher().hash(password)


def verify_password(hashed: str, password: str) -> bool:
    """Whether `password` matches `hashed`."""
    try:
        return password_hasher().verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


def is_password_hash(value: object) -> bool:
    """Whether `value` is an argon2id hash (what a dead letter keeps instead of a password)."""
    return isinstance(value, str) and value.startswith("$argon2id$") and len(value) <= 255


# --- the rule ------------------------------------------------------------------------------

_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")


def _folded(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


@lru_cache(maxsize=4096)
def _secret_name(name: str) -> bool:
    squeezed = _NOT_ALPHANUMERIC.sub("", _folded(name))
    return any(word in squeezed for word in SECRET_WORDS)


def is_secret_key(name: object) -> bool:
    """Whether a value under the key `name` is a secret (the rule in the module docstring)."""
    try:
        text = name if isinstance(name, str) else str(name)
        # Long keys are not cached (the cache would hold any producer's megabyte key).
        return _secret_name(text) if len(text) <= 256 else _secret_name.__wrapped__(text)
    except Exception:
        return True  # a key that cannot even be read is not shown


def _word_pattern(word: str) -> str:
    # As in a key, one separator may sit between the letters: "pass_word", "api-key".
    return r"[\s_.-]?".join(re.escape(letter) for letter in word)


# A secret-like key in (lower-case) text, as a key: followed (after the rest of its name, a
# closing quote or escape, and spaces) by ":" or "=". The name may go on ("password_hash")
# but not past a space: prose such as "password reset at 10:30" is not a key.
_SECRET_IN_TEXT = re.compile(
    r"(?:" + "|".join(_word_pattern(word) for word in SECRET_WORDS) + r")"
    r"[\w.-]{0,64}?[\"'`\\]*\s*[:=]")


def mentions_secret(text: str | bytes | bytearray) -> bool:
    """Whether `text` holds a secret-like key followed by `:` or `=` (so, perhaps, a secret)."""
    try:
        if isinstance(text, bytes | bytearray):
            text = bytes(text).decode("latin-1")
        # Lower-cased rather than matched without regard to case: some 20 times faster on a
        # long text. Lookalike letters (fullwidth, ligatures, the long s) fold to plain ones.
        shown = text.lower() if text.isascii() else _folded(text)
        return ("=" in shown or ":" in shown) and _SECRET_IN_TEXT.search(shown) is not None
    except Exception:
        return True


# --- redaction ------------------------------------------------------------------------------

_SCALARS = (str, int, float, bytes, bytearray, type(None))


def _plain(text: str) -> bool:
    """Whether `text` surely mentions no secret (cheap: most strings stop here)."""
    return "=" not in text and ":" not in text and text.isascii()


def _leaf(value: Any, unnamed: bool) -> Any:
    """A value that holds no others, as shown."""
    if isinstance(value, str | bytes | bytearray) and (
            unnamed or (not (isinstance(value, str) and _plain(value)) and mentions_secret(value))):
        return REDACTED
    return value


def _walk(value: Any, unnamed: bool) -> Any:
    """The redacted copy of `value`, built without recursion (any depth, cycles included).

    `unnamed`: strings not under a key of an object are secrets too (positional arguments).
    """
    root: list[Any] = [None]
    # (value, container to fill, slot in it, depth, unnamed)
    pending: list[tuple[Any, Any, Any, int, bool]] = [(value, root, 0, 0, unnamed)]
    tuples: list[tuple[Any, Any, list[Any]]] = []
    while pending:
        item, parent, slot, depth, anonymous = pending.pop()
        if isinstance(item, list | tuple):
            if depth >= MAX_DEPTH:
                parent[slot] = NESTED_TOO_DEEPLY
                continue
            elements: list[Any] = [None] * len(item)
            parent[slot] = elements
            if isinstance(item, tuple):
                tuples.append((parent, slot, elements))
            for index, child in enumerate(item):
                if isinstance(child, _SCALARS):  # most values: placed now, not stacked
                    elements[index] = _leaf(child, anonymous)
                else:
                    pending.append((child, elements, index, depth + 1, anonymous))
        elif not isinstance(item, _SCALARS) and isinstance(item, Mapping):
            if depth >= MAX_DEPTH:
                parent[slot] = NESTED_TOO_DEEPLY
                continue
            copy: dict[Any, Any] = {}
            parent[slot] = copy
            for number, (key, child) in enumerate(list(item.items())):
                shown_key = key
                if isinstance(key, str | bytes | bytearray) and not (
                        isinstance(key, str) and _plain(key)) and mentions_secret(key):
                    shown_key = f"{REDACTED_KEY} {number}"
                if is_secret_key(key):
                    copy[shown_key] = REDACTED
                elif isinstance(child, _SCALARS):
                    copy[shown_key] = _leaf(child, False)
                else:
                    copy[shown_key] = None
                    pending.append((child, copy, shown_key, depth + 1, False))
        else:
            parent[slot] = _leaf(item, anonymous)
    # Made last, innermost first (each was recorded after its container): a tuple is built
    # from elements that are final.
    for parent, slot, elements in reversed(tuples):
        parent[slot] = tuple(elements)
    return root[0]


def redact(value: Any) -> Any:
    """A copy of `value` with every secret replaced, at any depth; never raises.

    Dicts (any mapping) become dicts, lists lists, tuples tuples; other values are kept
    (strings that mention a secret-like key become REDACTED).
    """
    try:
        return _walk(value, unnamed=False)
    except Exception:
        return UNREPRESENTABLE


def redact_args(args: Any) -> Any:
    """Positional arguments as shown: `redact`, and every string not under a key replaced."""
    try:
        return _walk(args, unnamed=True)
    except Exception:
        return UNREPRESENTABLE


# --- showing --------------------------------------------------------------------------------

REPR_LIMIT = 1024


def safe_repr(value: Any, limit: int = REPR_LIMIT, *, positional: bool = False) -> str:
    """A short repr of `value` with every secret replaced: for logs, events and Flower.

    At most `limit` characters; `positional` for positional arguments (see `redact_args`).
    Never raises. The redacted copy holds only plain values (what JSON decodes to, nested at
    most MAX_DEPTH deep), so the built-in repr serves, cut afterwards: its work is bounded by
    the message's size, and it is many times faster than reprlib's.
    """
    try:
        shown = repr(redact_args(value) if positional else redact(value))
    except Exception:
        shown = UNREPRESENTABLE
    return shown if len(shown) <= limit else shown[:max(0, limit - 3)] + "..."


@functools.lru_cache(maxsize=256)
def _printable_cached(text: str, limit: int) -> str:
    return _printable(text, limit)


def _printable(text: str, limit: int) -> str:
    shown = text[:limit]
    if not shown.isprintable():
        # repr's escapes, without its quotes: control characters, lone surrogates, NUL.
        shown = "".join(char if char.isprintable() else repr(char)[1:-1] for char in shown)
    return shown[:limit] + ("..." if len(text) > limit or len(shown) > limit else "")


def printable(value: object, limit: int = 200) -> str:
    """`value` as text safe to echo in a message or a log line (names, not values).

    Cut to `limit` characters, non-printable characters escaped (`\\x00`, `\\ud800`), and
    REDACTED if it mentions a secret-like key with a value. Never raises.
    """
    try:
        text = value if isinstance(value, str) else str(value)
        if mentions_secret(text[:limit * 2]):
            return REDACTED
        return _printable_cached(text, limit) if len(text) <= 256 else _printable(text, limit)
    except Exception:
        return UNREPRESENTABLE
