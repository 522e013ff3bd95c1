"""The benchmark's baseline: a worker written the way the classic tutorial writes it.

A task per command, one ORM session with add + commit + refresh per command, Celery's
defaults (early acknowledgement, prefetch 4, prefork), the engine created at import. It is
here to be measured against, never to be run for real: it has no ledger, no dead letters
and none of the guarantees.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from worker.models import Post, Tag, User
from worker.security import hash_password

QUEUE = "baseline"

app = Celery("baseline", broker=os.environ.get("BENCH_BROKER_URL", "memory://"),
             backend=os.environ.get("BENCH_BROKER_URL", "cache+memory://"))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                task_default_queue=QUEUE)

engine = create_engine(os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg2://"))
SessionLocal = sessionmaker(bind=engine)


@app.task(name="posts.create", shared=False)
def create_post(data: dict[str, Any], command_id: str | None = None) -> dict[str, Any]:
    """Insert a post, getting or creating its tags."""
    db = SessionLocal()
    try:
        post = Post(title=data["title"], content=data.get("content"),
                    author_id=data["author_id"], version=1)
        for name in data.get("tags", []):
            tag = db.scalars(select(Tag).where(Tag.name == name)).first()
            if tag is None:
                tag = Tag(name=name, version=1)
                db.add(tag)
            post.tags.append(tag)
        db.add(post)
        db.commit()
        db.refresh(post)
        return {"id": post.id, "title": post.title}
    finally:
        db.close()


@app.task(name="users.create", shared=False)
def create_user(data: dict[str, Any], command_id: str | None = None) -> dict[str, Any]:
    """Insert a user with a hashed password."""
    db = SessionLocal()
    try:
        user = User(username=data["username"], email=data["email"],
                    hashed_password=hash_password(data["password"]), version=1)
        db.add(user)
        db.commit()
        db.refresh(user)
        return {"id": user.id, "username": user.username}
    finally:
        db.close()
