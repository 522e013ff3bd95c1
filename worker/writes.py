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
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from worker.errors import CommandRejected, Conflict, NotFound, Stale
from worker.schemas import PostCreate, PostUpdate, TagCreate, TagUpdate, UserCreate, UserUpdate

Record = dict[str, Any]
Outcome = Record | CommandRejected


@dataclass(frozen=True)
class Change:
    """An update or delete: the target id, its expected version, and the data (updates)."""

    id: int
    expected_version: int | None
    data: Any = None


def _iso(value: Any) -> Any:
    return value.isoformat().replace("+00:00", "Z") if hasattr(value, "isoformat") else value


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


def _next_ids(session: Session, table: str, count: int) -> list[int]:
    # Ids drawn up front map each inserted row to its command without trusting RETURNING order.
    rows = session.execute(
        text(f"SELECT nextval(pg_get_serial_sequence('{table}', 'id')) "
             "FROM generate_series(1, :n)"), {"n": count})
    return [row[0] for row in rows]


def _locked(session: Session, table: str, changes: Sequence[Change],
            label: str) -> tuple[dict[int, Any], list[CommandRejected | None]]:
    """Lock the targets; per change, `NotFound`/`Stale` or None when it may proceed."""
    ids = [change.id for change in changes]
    rows = {row.id: row for row in session.execute(
        text(f"SELECT * FROM {table} WHERE id = ANY(CAST(:ids AS int[])) ORDER BY id FOR UPDATE"),
        {"ids": ids})}
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
    return rows, verdicts


def _delete(session: Session, table: str, label: str, changes: Sequence[Change],
            record: Callable[[Any], Record]) -> list[Outcome]:
    """Delete the rows that pass the checks; each outcome is the record as it was."""
    rows, verdicts = _locked(session, table, changes, label)
    doomed = [change.id for change, verdict in zip(changes, verdicts, strict=True) if not verdict]
    if doomed:
        session.execute(text(f"DELETE FROM {table} WHERE id = ANY(CAST(:ids AS int[]))"),
                        {"ids": doomed})
    return [verdict or record(rows[change.id])
            for change, verdict in zip(changes, verdicts, strict=True)]


# --- tags ---------------------------------------------------------------------------------

def ensure_tags(session: Session, names: Sequence[str]) -> dict[str, int]:
    """Ids of the tags named `names`, creating the missing ones."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    # ON CONFLICT DO NOTHING waits for a concurrent insert of the same name instead of failing.
    session.execute(text(
        "INSERT INTO tags (name, version) SELECT n, 1 FROM unnest(CAST(:names AS text[])) AS n "
        "ON CONFLICT (name) DO NOTHING"), {"names": wanted})
    rows = session.execute(
        text("SELECT id, name FROM tags WHERE name = ANY(CAST(:names AS text[]))"),
        {"names": wanted})
    return {row.name: row.id for row in rows}


def create_tags(session: Session, items: Sequence[TagCreate]) -> list[Outcome]:
    """Insert tags; a name already taken (or taken earlier in the run) is a conflict."""
    names = [item.name for item in items]
    taken = {row.name for row in session.execute(
        text("SELECT name FROM tags WHERE name = ANY(CAST(:names AS text[]))"), {"names": names})}
    outcomes: list[Outcome | None] = []
    fresh: list[str] = []
    for name in names:
        if name in taken:
            outcomes.append(Conflict("tag name already taken"))
        else:
            taken.add(name)
            fresh.append(name)
            outcomes.append(None)
    if fresh:
        ids = _next_ids(session, "tags", len(fresh))
        session.execute(text(
            "INSERT INTO tags (id, name, version) SELECT i, n, 1 FROM "
            "unnest(CAST(:ids AS int[]), CAST(:names AS text[])) AS v(i, n)"),
            {"ids": ids, "names": fresh})
        created = iter({"id": i, "name": n, "version": 1} for i, n in zip(ids, fresh, strict=True))
        return [outcome if outcome is not None else next(created) for outcome in outcomes]
    return [outcome for outcome in outcomes if outcome is not None]


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
    ids = _next_ids(session, "users", len(fresh))
    rows = {row.id: row for row in session.execute(text(
        "INSERT INTO users (id, username, email, hashed_password, is_active, version) "
        "SELECT i, u, e, h, a, 1 FROM unnest(CAST(:ids AS int[]), CAST(:usernames AS text[]), "
        "CAST(:emails AS text[]), CAST(:hashes AS text[]), CAST(:active AS boolean[])) "
        "AS v(i, u, e, h, a) RETURNING *"),
        {"ids": ids, "usernames": [item.username for item in fresh],
         "emails": [item.email for item in fresh],
         "hashes": [item.password_hash for item in fresh],
         "active": [item.is_active for item in fresh]})}
    created = iter(_user(rows[i]) for i in ids)
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

def _link(session: Session, post_ids: Sequence[int], tag_lists: Sequence[Sequence[str]]
          ) -> None:
    ids = ensure_tags(session, [name for names in tag_lists for name in names])
    pairs = sorted({(post_id, ids[name]) for post_id, names in zip(post_ids, tag_lists,
                                                                   strict=True)
                    for name in names})
    if pairs:
        session.execute(text(
            "INSERT INTO post_tags (post_id, tag_id) SELECT * FROM "
            "unnest(CAST(:posts AS int[]), CAST(:tags AS int[]))"),
            {"posts": [p for p, _ in pairs], "tags": [t for _, t in pairs]})


def _tag_names(session: Session, post_ids: Sequence[int]) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {post_id: [] for post_id in post_ids}
    for row in session.execute(text(
            "SELECT pt.post_id, t.name FROM post_tags pt JOIN tags t ON t.id = pt.tag_id "
            "WHERE pt.post_id = ANY(CAST(:ids AS int[]))"), {"ids": list(post_ids)}):
        names[row.post_id].append(row.name)
    return names


def create_posts(session: Session, items: Sequence[PostCreate]) -> list[Outcome]:
    """Insert posts by existing authors; tags named but missing are created."""
    # KEY SHARE locks keep the authors from being deleted before this commits.
    authors = {row.id for row in session.execute(text(
        "SELECT id FROM users WHERE id = ANY(CAST(:ids AS int[])) FOR KEY SHARE"),
        {"ids": sorted({item.author_id for item in items})})}
    fresh = [index for index, item in enumerate(items) if item.author_id in authors]
    created: dict[int, Record] = {}
    if fresh:
        ids = _next_ids(session, "posts", len(fresh))
        chosen = [items[index] for index in fresh]
        rows = {row.id: row for row in session.execute(text(
            "INSERT INTO posts (id, title, content, author_id, version) "
            "SELECT i, t, c, a, 1 FROM unnest(CAST(:ids AS int[]), CAST(:titles AS text[]), "
            "CAST(:contents AS text[]), CAST(:authors AS int[])) AS v(i, t, c, a) "
            "RETURNING id, title, content, author_id, created_at, version"),
            {"ids": ids, "titles": [item.title for item in chosen],
             "contents": [item.content for item in chosen],
             "authors": [item.author_id for item in chosen]})}
        tag_lists = [list(dict.fromkeys(item.tags)) for item in chosen]
        _link(session, ids, tag_lists)
        created = {index: _post(rows[i], names)
                   for index, i, names in zip(fresh, ids, tag_lists, strict=True)}
    return [created.get(index) or NotFound(f"author {item.author_id} does not exist")
            for index, item in enumerate(items)]


def update_posts(session: Session, changes: Sequence[Change]) -> list[Outcome]:
    """Change the fields each update gives; `tags` replaces a post's whole set."""
    _, verdicts = _locked(session, "posts", changes, "post")
    go = [change for change, verdict in zip(changes, verdicts, strict=True) if not verdict]
    updated: dict[int, Any] = {}
    if go:
        datas: list[PostUpdate] = [change.data for change in go]
        updated = {row.id: row for row in session.execute(text(
            "UPDATE posts SET title = COALESCE(v.t, posts.title), "
            "content = CASE WHEN v.sc THEN v.c ELSE posts.content END, "
            "version = posts.version + 1 "
            "FROM unnest(CAST(:ids AS int[]), CAST(:titles AS text[]), "
            "CAST(:set_content AS boolean[]), CAST(:contents AS text[])) AS v(i, t, sc, c) "
            "WHERE posts.id = v.i RETURNING posts.*"),
            {"ids": [change.id for change in go], "titles": [d.title for d in datas],
             "set_content": ["content" in d.model_fields_set for d in datas],
             "contents": [d.content for d in datas]})}
        retagged = [(change.id, change.data.tags) for change in go
                    if change.data.tags is not None]
        if retagged:
            session.execute(text("DELETE FROM post_tags WHERE post_id = ANY(CAST(:ids AS int[]))"),
                            {"ids": [post_id for post_id, _ in retagged]})
            _link(session, [p for p, _ in retagged], [list(dict.fromkeys(t)) for _, t in retagged])
    names = _tag_names(session, list(updated))
    return [verdict or _post(updated[change.id], names[change.id])
            for change, verdict in zip(changes, verdicts, strict=True)]


def delete_posts(session: Session, changes: Sequence[Change]) -> list[Outcome]:
    """Delete posts and their tag links."""
    rows, verdicts = _locked(session, "posts", changes, "post")
    doomed = [change.id for change, verdict in zip(changes, verdicts, strict=True) if not verdict]
    names = _tag_names(session, doomed)
    if doomed:
        session.execute(text("DELETE FROM posts WHERE id = ANY(CAST(:ids AS int[]))"),
                        {"ids": doomed})
    return [verdict or _post(rows[change.id], names[change.id])
            for change, verdict in zip(changes, verdicts, strict=True)]
