"""Set-based writes: each applies a run of same-kind commands in a few statements.

Every function takes a run of commands (distinct target ids within the run) and returns, in
order, the stored record of each or the rejection it earned. Nothing commits here. Checks
come before writes, so a rejection never leaves a partial effect; a race the checks could
not see (a concurrent insert of the same name) surfaces as a database error that makes the
caller retry the commands one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from worker.errors import CommandRejected, Conflict, NotFound, Stale
from worker.schemas import (
    PostCreate,
    PostUpdate,
    TagCreate,
    TagUpdate,
    UserCreate,
    UserUpdate,
    timestamp,
)

Record = dict[str, Any]
Outcome = Record | CommandRejected


@dataclass(frozen=True)
class Change:
    """An update or delete: the target id, its expected version, and the data (updates)."""

    id: int
    expected_version: int | None
    data: Any = None


def _iso(value: Any) -> Any:
    return timestamp(value) if isinstance(value, datetime) else value


def _user(row: Any) -> Record:
    return {"id": row.id, "username": row.username, "email": row.email,
            "is_active": row.is_active, "created_at": _iso(row.created_at),
            "updated_at": _iso(row.updated_at), "version": row.version}


def _tag(row: Any) -> Record:
    return {"id": row.id, "name": row.name, "version": row.version}


def _post(row: Any, tags: Sequence[str]) -> Record:
    return {"id": row.id, "title": row.title, "content": row.content,
            "author_id": row.author_id, "created_at": _iso(row.created_at),
            "version": row.version, "tags": sorted(tags)}


def _locked(session: Session, table: str, changes: Sequence[Change],
            label: str) -> tuple[dict[int, Any], list[CommandRejected | None]]:
    """Lock the targets; per change, `NotFound`/`Stale` or None when it may proceed."""
    rows = {row.id: row for row in session.execute(
        text(f"SELECT * FROM {table} WHERE id = ANY(CAST(:ids AS int[])) ORDER BY id FOR UPDATE"),
        {"ids": [change.id for change in changes]})}
    return rows, _verdicts(rows, changes, label)


def _verdicts(rows: dict[int, Any], changes: Sequence[Change],
              label: str) -> list[CommandRejected | None]:
    """Per change: `NotFound` without a row, `Stale` on another version, else None."""
    verdicts: list[CommandRejected | None] = []
    for change in changes:
        row = rows.get(change.id)
        if row is None:
            verdicts.append(NotFound(f"{label} {change.id} does not exist"))
        elif change.expected_version is not None and row.version != change.expected_version:
            verdicts.append(Stale(f"expected version {change.expected_version}, "
                                  f"stored version is {row.version}"))
        else:
            verdicts.append(None)
    return verdicts


def _delete(session: Session, table: str, label: str, changes: Sequence[Change],
            record: Callable[[Any], Record], also: str = "") -> list[Outcome]:
    """Delete the rows that pass the checks, in one statement; each outcome is the row as it was.

    The targets are locked in id order (so concurrent batches cannot deadlock on them); the
    rows returned are the locked ones, with `deleted` telling which passed the version check.
    `also` adds columns computed from the row as it was (`l` is the row).
    """
    rows = {row.id: row for row in session.execute(text(
        f"WITH v AS (SELECT * FROM unnest(CAST(:ids AS int[]), CAST(:expected AS int[])) "
        f"AS v(i, e)), "
        f"locked AS (SELECT * FROM {table} WHERE id IN (SELECT i FROM v) ORDER BY id FOR UPDATE), "
        f"gone AS (DELETE FROM {table} t USING locked JOIN v ON v.i = locked.id "
        f"WHERE t.id = locked.id AND (v.e IS NULL OR locked.version = v.e) RETURNING t.id) "
        f"SELECT l.*, l.id IN (SELECT id FROM gone) AS deleted{also} FROM locked l"),
        {"ids": [change.id for change in changes],
         "expected": [change.expected_version for change in changes]})}
    verdicts = _verdicts(rows, changes, label)
    assert all(rows[change.id].deleted == (verdict is None)
               for change, verdict in zip(changes, verdicts, strict=True)
               if change.id in rows), "the version check in SQL and in Python disagree"
    return [verdict or record(rows[change.id])
            for change, verdict in zip(changes, verdicts, strict=True)]


# --- tags ---------------------------------------------------------------------------------

def _tag_ctes(wanted: str, pairs: str, replacing: bool = True) -> str:
    """CTEs that create the missing tags and link posts to tags, ending with `known`.

    `wanted` is a query of the names (column n), `pairs` one of the links (p: post id, n:
    tag name). Missing tags are created in name order (so that concurrent inserts of the same
    names cannot deadlock); when `replacing`, each post listed in :replace loses its other
    links (new posts have none: their statement plans faster without that step).
    `known` (id, name) holds every wanted tag the statement could see.

    A name a concurrent transaction inserted after this statement's snapshot is neither created
    here (ON CONFLICT waits for that transaction, then skips) nor visible to `known`: the caller
    sees it missing and runs `_TAGS_AND_LINKS` again for it, with a fresh snapshot.
    """
    return (
        f"pairs AS ({pairs}), wanted AS ({wanted}), "
        "created AS (INSERT INTO tags (name, version) SELECT n, 1 FROM wanted "
        "WHERE NOT EXISTS (SELECT 1 FROM tags WHERE tags.name = wanted.n) ORDER BY n "
        "ON CONFLICT (name) DO NOTHING RETURNING id, name), "
        "known AS (SELECT id, name FROM created UNION ALL "
        "SELECT tags.id, tags.name FROM tags JOIN wanted ON tags.name = wanted.n), "
        "desired AS (SELECT DISTINCT pairs.p AS post_id, known.id AS tag_id "
        "FROM pairs JOIN known ON known.name = pairs.n), "
        + ("removed AS (DELETE FROM post_tags WHERE post_id = ANY(CAST(:replace AS int[])) "
           "AND (post_id, tag_id) NOT IN (SELECT post_id, tag_id FROM desired)), "
           if replacing else "")
        + "linked AS (INSERT INTO post_tags (post_id, tag_id) SELECT post_id, tag_id FROM desired "
        "ON CONFLICT DO NOTHING)")


# Tags :names (created when missing), links (:posts[i], :link_names[i]); the ids it could see.
_TAGS_AND_LINKS = text(
    "WITH " + _tag_ctes(
        "SELECT DISTINCT n FROM unnest(CAST(:names AS text[])) AS n",
        "SELECT * FROM unnest(CAST(:posts AS int[]), CAST(:link_names AS text[])) AS l(p, n)")
    + " SELECT id, name FROM known")
_TAG_ROUNDS = 3


def _tags_and_links(session: Session, names: Sequence[str],
                    links: Sequence[tuple[int, str]] = (),
                    replace: Sequence[int] = ()) -> dict[str, int]:
    """Ids of the tags `names` (missing ones created); link each (post id, tag name) pair.

    Posts in `replace` keep only the links given for them here.
    """
    ids: dict[str, int] = {}
    pending = sorted(set(names))
    if not pending and not replace:
        return ids
    for _ in range(_TAG_ROUNDS):
        wanted = set(pending)
        todo = [(post_id, name) for post_id, name in links if name in wanted]
        ids.update((row.name, row.id) for row in session.execute(_TAGS_AND_LINKS, {
            "names": pending, "posts": [post_id for post_id, _ in todo],
            "link_names": [name for _, name in todo], "replace": list(replace)}))
        pending = [name for name in pending if name not in ids]
        if not pending:
            return ids
        replace = ()  # done: a later round only adds the links of the names it missed
    raise RuntimeError(f"tags {pending} were neither created nor found in {_TAG_ROUNDS} tries")


def ensure_tags(session: Session, names: Sequence[str]) -> dict[str, int]:
    """Ids of the tags named `names`, creating the missing ones."""
    return _tags_and_links(session, names)


def create_tags(session: Session, items: Sequence[TagCreate]) -> list[Outcome]:
    """Insert tags; a name already taken (or taken earlier in the run) is a conflict."""
    outcomes: list[Outcome | None] = []
    fresh: list[str] = []
    for item in items:
        if item.name in fresh:
            outcomes.append(Conflict("tag name already taken"))
        else:
            fresh.append(item.name)
            outcomes.append(None)
    # Ids are drawn only for names not taken, in the order the commands came.
    created = {row.name: _tag(row) for row in session.execute(text(
        "WITH v AS (SELECT n, o FROM unnest(CAST(:names AS text[])) WITH ORDINALITY AS v(n, o) "
        "WHERE NOT EXISTS (SELECT 1 FROM tags WHERE tags.name = v.n)) "
        "INSERT INTO tags (id, name, version) "
        "SELECT nextval(pg_get_serial_sequence('tags', 'id')), n, 1 FROM v ORDER BY o "
        "ON CONFLICT (name) DO NOTHING RETURNING id, name, version"), {"names": fresh})}
    return [outcome or created.get(item.name) or Conflict("tag name already taken")
            for outcome, item in zip(outcomes, items, strict=True)]


def update_tags(session: Session, changes: Sequence[Change]) -> list[Outcome]:
    """Rename tags; a name held by another tag (or claimed earlier in the run) is a conflict."""
    _, verdicts = _locked(session, "tags", changes, "tag")
    names = [change.data.name for change in changes]
    holders = {row.name: row.id for row in session.execute(
        text("SELECT id, name FROM tags WHERE name = ANY(CAST(:names AS text[]))"),
        {"names": names})}
    go_ids: list[int] = []
    go_names: list[str] = []
    for index, change in enumerate(changes):
        data: TagUpdate = change.data
        if verdicts[index] is None:
            holder = holders.get(data.name)
            if holder is not None and holder != change.id:
                verdicts[index] = Conflict("tag name already taken")
            else:
                holders[data.name] = change.id
                go_ids.append(change.id)
                go_names.append(data.name)
    updated: dict[int, Any] = {}
    if go_ids:
        updated = {row.id: row for row in session.execute(text(
            "UPDATE tags SET name = v.n, version = tags.version + 1 "
            "FROM unnest(CAST(:ids AS int[]), CAST(:names AS text[])) AS v(i, n) "
            "WHERE tags.id = v.i RETURNING tags.id, tags.name, tags.version"),
            {"ids": go_ids, "names": go_names})}
    return [verdict or _tag(updated[change.id]) for change, verdict in zip(changes, verdicts,
                                                                          strict=True)]


def delete_tags(session: Session, changes: Sequence[Change]) -> list[Outcome]:
    """Delete tags (their links to posts go with them)."""
    return _delete(session, "tags", "tag", changes, _tag)


# --- users --------------------------------------------------------------------------------

def _unique_user_fields(session: Session, usernames: Sequence[str],
                        emails: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    rows = session.execute(text(
        "SELECT id, username, lower(email) AS email FROM users "
        "WHERE username = ANY(CAST(:usernames AS text[])) "
        "OR lower(email) = ANY(CAST(:emails AS text[]))"),
        {"usernames": list(usernames), "emails": [email.lower() for email in emails]})
    by_username: dict[str, int] = {}
    by_email: dict[str, int] = {}
    for row in rows:
        by_username[row.username] = row.id
        by_email[row.email] = row.id
    return by_username, by_email


def _claim_unique(user_id: int, username: str | None, email: str | None,
                  by_username: dict[str, int], by_email: dict[str, int]) -> Conflict | None:
    """Conflict if another user holds the username or email; else record this user's claim."""
    if username is not None and by_username.get(username, user_id) != user_id:
        return Conflict("username already taken")
    if email is not None and by_email.get(email.lower(), user_id) != user_id:
        return Conflict("email already registered")
    if username is not None:
        by_username[username] = user_id
    if email is not None:
        by_email[email.lower()] = user_id
    return None


def create_users(session: Session, items: Sequence[UserCreate]) -> list[Outcome]:
    """Insert users; each item carries `password_hash` (hashed before the transaction)."""
    by_username, by_email = _unique_user_fields(
        session, [item.username for item in items], [item.email for item in items])
    outcomes: list[Outcome | None] = []
    fresh: list[UserCreate] = []
    for index, item in enumerate(items):
        conflict = _claim_unique(-1 - index, item.username, item.email, by_username, by_email)
        outcomes.append(conflict)
        if conflict is None:
            fresh.append(item)
    if not fresh:
        return [outcome for outcome in outcomes if outcome is not None]
    # Usernames are unique: they map the inserted rows back to their commands.
    rows = {row.username: row for row in session.execute(text(
        "INSERT INTO users (id, username, email, hashed_password, is_active, version) "
        "SELECT nextval(pg_get_serial_sequence('users', 'id')), u, e, h, a, 1 "
        "FROM unnest(CAST(:usernames AS text[]), CAST(:emails AS text[]), "
        "CAST(:hashes AS text[]), CAST(:active AS boolean[])) WITH ORDINALITY "
        "AS v(u, e, h, a, o) ORDER BY o RETURNING *"),
        {"usernames": [item.username for item in fresh],
         "emails": [item.email for item in fresh],
         "hashes": [item.password_hash for item in fresh],
         "active": [item.is_active for item in fresh]})}
    created = iter(_user(rows[item.username]) for item in fresh)
    return [outcome if outcome is not None else next(created) for outcome in outcomes]


def update_users(session: Session, changes: Sequence[Change]) -> list[Outcome]:
    """Change only the fields each update gives (a password arrives already hashed)."""
    _, verdicts = _locked(session, "users", changes, "user")
    by_username, by_email = _unique_user_fields(
        session, [c.data.username for c in changes if c.data.username is not None],
        [c.data.email for c in changes if c.data.email is not None])
    go: list[tuple[int, UserUpdate]] = []
    for index, change in enumerate(changes):
        if verdicts[index] is None:
            data: UserUpdate = change.data
            verdicts[index] = _claim_unique(change.id, data.username, data.email,
                                            by_username, by_email)
            if verdicts[index] is None:
                go.append((change.id, data))
    updated: dict[int, Any] = {}
    if go:
        updated = {row.id: row for row in session.execute(text(
            "UPDATE users SET username = COALESCE(v.u, users.username), "
            "email = COALESCE(v.e, users.email), "
            "hashed_password = COALESCE(v.h, users.hashed_password), "
            "is_active = COALESCE(v.a, users.is_active), "
            "version = users.version + 1, updated_at = now() "
            "FROM unnest(CAST(:ids AS int[]), CAST(:usernames AS text[]), "
            "CAST(:emails AS text[]), CAST(:hashes AS text[]), CAST(:active AS boolean[])) "
            "AS v(i, u, e, h, a) WHERE users.id = v.i RETURNING users.*"),
            {"ids": [i for i, _ in go], "usernames": [d.username for _, d in go],
             "emails": [d.email for _, d in go], "hashes": [d.password_hash for _, d in go],
             "active": [d.is_active for _, d in go]})}
    return [verdict or _user(updated[change.id]) for change, verdict in zip(changes, verdicts,
                                                                           strict=True)]


def delete_users(session: Session, changes: Sequence[Change]) -> list[Outcome]:
    """Delete users; their posts and those posts' tag links go with them."""
    return _delete(session, "users", "user", changes, _user)


# --- posts --------------------------------------------------------------------------------

# Tag names of a post as stored when the statement began (`l` is the post row).
_TAG_NAMES_OF_L = (", ARRAY(SELECT t.name FROM post_tags pt JOIN tags t ON t.id = pt.tag_id "
                   "WHERE pt.post_id = l.id) AS tag_names")


def _links(post_ids: Sequence[int], tag_lists: Sequence[Sequence[str]]
           ) -> list[tuple[int, str]]:
    return [(post_id, name) for post_id, names in zip(post_ids, tag_lists, strict=True)
            for name in names]


# Posts by existing authors, with ids drawn in command order (only for posts whose author
# exists), their tags (missing ones created) and links, in one statement. The foreign key
# checks then hold KEY SHARE locks on the authors, so none is deleted before this commits (a
# concurrent delete makes the statement fail instead). Each row: the command's ordinal, the
# post, and every tag name the statement could see (see `_tag_ctes`).
_CREATE_POSTS = text(
    "WITH v AS MATERIALIZED (SELECT nextval(pg_get_serial_sequence('posts', 'id')) AS i, "
    "t, c, a, o FROM unnest(CAST(:titles AS text[]), CAST(:contents AS text[]), "
    "CAST(:authors AS int[])) WITH ORDINALITY AS v(t, c, a, o) "
    "WHERE EXISTS (SELECT 1 FROM users WHERE users.id = v.a) ORDER BY o), "
    "ins AS (INSERT INTO posts (id, title, content, author_id, version) "
    "SELECT i, t, c, a, 1 FROM v "
    "RETURNING id, title, content, author_id, created_at, version), "
    + _tag_ctes(
        "SELECT DISTINCT n FROM pairs",
        "SELECT v.i AS p, l.n FROM unnest(CAST(:link_ordinals AS int[]), "
        "CAST(:link_names AS text[])) AS l(o, n) JOIN v ON v.o = l.o", replacing=False)
    + " SELECT v.o, ins.*, ARRAY(SELECT name FROM known) AS known_tags "
    "FROM ins JOIN v ON v.i = ins.id")


def create_posts(session: Session, items: Sequence[PostCreate]) -> list[Outcome]:
    """Insert posts by existing authors; tags named but missing are created."""
    tag_lists = [list(dict.fromkeys(item.tags)) for item in items]
    links = [(ordinal, name) for ordinal, names in enumerate(tag_lists, start=1)
             for name in names]
    rows = {row.o - 1: row for row in session.connection().execute(_CREATE_POSTS, {
        "titles": [item.title for item in items],
        "contents": [item.content for item in items],
        "authors": [item.author_id for item in items],
        "link_ordinals": [ordinal for ordinal, _ in links],
        "link_names": [name for _, name in links]})}
    if rows:
        known = set(next(iter(rows.values())).known_tags)
        missed = [(rows[index].id, name) for index in rows for name in tag_lists[index]
                  if name not in known]
        if missed:
            _tags_and_links(session, [name for _, name in missed], missed)
    return [_post(rows[index], tag_lists[index]) if index in rows
            else NotFound(f"author {item.author_id} does not exist")
            for index, item in enumerate(items)]


def update_posts(session: Session, changes: Sequence[Change]) -> list[Outcome]:
    """Change the fields each update gives; `tags` replaces a post's whole set."""
    _, verdicts = _locked(session, "posts", changes, "post")
    go = [change for change, verdict in zip(changes, verdicts, strict=True) if not verdict]
    updated: dict[int, Any] = {}
    tags: dict[int, list[str]] = {}
    if go:
        datas: list[PostUpdate] = [change.data for change in go]
        updated = {row.id: row for row in session.execute(text(
            "UPDATE posts l SET title = COALESCE(v.t, l.title), "
            "content = CASE WHEN v.sc THEN v.c ELSE l.content END, "
            "version = l.version + 1 "
            "FROM unnest(CAST(:ids AS int[]), CAST(:titles AS text[]), "
            "CAST(:set_content AS boolean[]), CAST(:contents AS text[])) AS v(i, t, sc, c) "
            "WHERE l.id = v.i RETURNING l.*" + _TAG_NAMES_OF_L),
            {"ids": [change.id for change in go], "titles": [d.title for d in datas],
             "set_content": ["content" in d.model_fields_set for d in datas],
             "contents": [d.content for d in datas]})}
        tags = {post_id: list(row.tag_names) for post_id, row in updated.items()}
        retagged = {change.id: list(dict.fromkeys(change.data.tags)) for change in go
                    if change.data.tags is not None}
        if retagged:
            _tags_and_links(session, [name for names in retagged.values() for name in names],
                            _links(list(retagged), list(retagged.values())),
                            replace=list(retagged))
            tags.update(retagged)
    return [verdict or _post(updated[change.id], tags[change.id])
            for change, verdict in zip(changes, verdicts, strict=True)]


def delete_posts(session: Session, changes: Sequence[Change]) -> list[Outcome]:
    """Delete posts and their tag links."""
    return _delete(session, "posts", "post", changes,
                   lambda row: _post(row, row.tag_names), also=_TAG_NAMES_OF_L)
