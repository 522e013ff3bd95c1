# mypy: disallow-untyped-decorators=False
"""The baseline: a command worker written the way the classic Celery + SQLAlchemy tutorial does.

A task per command; each opens `SessionLocal()`, changes objects, commits, refreshes and
returns a dict. Celery's defaults (prefork, early acknowledgement, prefetch of 4, results in
Redis) except JSON, the URLs and its own queue. The engine is made at import, as the
tutorial does. It validates nothing and keeps no ledger: it is here to be measured against,
never to be run for real. It uses the project's models and password hash, so the work per
row and per hash is the same as this worker's. Its tasks are registered on this app only
(`shared=False`), so importing it never shadows the worker's own tasks of the same names.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from celery import Celery
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from worker.models import Post, Tag, User
from worker.security import hash_password

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1/postgres")
BROKER_URL = os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BASELINE_QUEUE", "bench-baseline")

app = Celery("baseline", broker=BROKER_URL, backend=BROKER_URL)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                task_default_queue=QUEUE)

engine = create_engine(DATABASE_URL)
SessionLocal = sessionmaker(autocommit=False, autoflush=False, bind=engine)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def user_out(user: User) -> dict[str, Any]:
    """A user as the API would return it."""
    return {"id": user.id, "username": user.username, "email": user.email,
            "is_active": user.is_active, "created_at": _iso(user.created_at),
            "updated_at": _iso(user.updated_at), "version": user.version}


def post_out(post: Post) -> dict[str, Any]:
    """A post as the API would return it, with its tag names."""
    return {"id": post.id, "title": post.title, "content": post.content,
            "author_id": post.author_id, "created_at": _iso(post.created_at),
            "version": post.version, "tags": [tag.name for tag in post.tags]}


def tag_out(tag: Tag) -> dict[str, Any]:
    """A tag as the API would return it."""
    return {"id": tag.id, "name": tag.name, "version": tag.version}


def get_or_create_tags(db: Session, names: list[str]) -> list[Tag]:
    """The tags named, created when missing (one query per name, as tutorials do)."""
    tags = []
    for name in names:
        tag = db.scalars(select(Tag).where(Tag.name == name)).first()
        if tag is None:
            tag = Tag(name=name, version=1)
            db.add(tag)
        tags.append(tag)
    return tags


@app.task(name="users.create", shared=False)
def create_user(data: dict[str, Any], command_id: str | None = None) -> dict[str, Any]:
    """Insert a user with a hashed password."""
    db = SessionLocal()
    try:
        user = User(username=data["username"], email=data["email"],
                    hashed_password=hash_password(data["password"]),
                    is_active=data.get("is_active", True), version=1)
        db.add(user)
        db.commit()
        db.refresh(user)
        return user_out(user)
    finally:
        db.close()


@app.task(name="users.update", shared=False)
def update_user(id: int, data: dict[str, Any], command_id: str | None = None) -> dict[str, Any]:
    """Change the fields given."""
    db = SessionLocal()
    try:
        user = db.get(User, id)
        if user is None:
            raise ValueError(f"user {id} not found")
        for key, value in data.items():
            if key == "password":
                user.hashed_password = hash_password(value)
            else:
                setattr(user, key, value)
        user.version += 1
        db.commit()
        db.refresh(user)
        return user_out(user)
    finally:
        db.close()


@app.task(name="users.delete", shared=False)
def delete_user(id: int, command_id: str | None = None) -> dict[str, Any]:
    """Delete a user (the database cascades to their posts)."""
    db = SessionLocal()
    try:
        user = db.get(User, id)
        if user is None:
            raise ValueError(f"user {id} not found")
        out = user_out(user)
        db.delete(user)
        db.commit()
        return out
    finally:
        db.close()


@app.task(name="posts.create", shared=False)
def create_post(data: dict[str, Any], command_id: str | None = None) -> dict[str, Any]:
    """Insert a post, getting or creating its tags."""
    db = SessionLocal()
    try:
        post = Post(title=data["title"], content=data.get("content"),
                    author_id=data["author_id"], version=1)
        post.tags = get_or_create_tags(db, data.get("tags", []))
        db.add(post)
        db.commit()
        db.refresh(post)
        return post_out(post)
    finally:
        db.close()


@app.task(name="posts.update", shared=False)
def update_post(id: int, data: dict[str, Any], command_id: str | None = None) -> dict[str, Any]:
    """Change the fields given; `tags` replaces the set."""
    db = SessionLocal()
    try:
        post = db.get(Post, id)
        if post is None:
            raise ValueError(f"post {id} not found")
        for key, value in data.items():
            if key == "tags":
                post.tags = get_or_create_tags(db, value)
            else:
                setattr(post, key, value)
        post.version += 1
        db.commit()
        db.refresh(post)
        return post_out(post)
    finally:
        db.close()


@app.task(name="posts.delete", shared=False)
def delete_post(id: int, command_id: str | None = None) -> dict[str, Any]:
    """Delete a post (the database cascades to its tag links)."""
    db = SessionLocal()
    try:
        post = db.get(Post, id)
        if post is None:
            raise ValueError(f"post {id} not found")
        out = post_out(post)
        db.delete(post)
        db.commit()
        return out
    finally:
        db.close()


@app.task(name="tags.create", shared=False)
def create_tag(data: dict[str, Any], command_id: str | None = None) -> dict[str, Any]:
    """Insert a tag."""
    db = SessionLocal()
    try:
        tag = Tag(name=data["name"], version=1)
        db.add(tag)
        db.commit()
        db.refresh(tag)
        return tag_out(tag)
    finally:
        db.close()


@app.task(name="tags.update", shared=False)
def update_tag(id: int, data: dict[str, Any], command_id: str | None = None) -> dict[str, Any]:
    """Rename a tag."""
    db = SessionLocal()
    try:
        tag = db.get(Tag, id)
        if tag is None:
            raise ValueError(f"tag {id} not found")
        tag.name = data["name"]
        tag.version += 1
        db.commit()
        db.refresh(tag)
        return tag_out(tag)
    finally:
        db.close()


@app.task(name="tags.delete", shared=False)
def delete_tag(id: int, command_id: str | None = None) -> dict[str, Any]:
    """Delete a tag (the database cascades to its links)."""
    db = SessionLocal()
    try:
        tag = db.get(Tag, id)
        if tag is None:
            raise ValueError(f"tag {id} not found")
        out = tag_out(tag)
        db.delete(tag)
        db.commit()
        return out
    finally:
        db.close()
