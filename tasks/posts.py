"""posts.create, posts.update, posts.delete."""

from __future__ import annotations

from sqlalchemy.orm import Session

from worker import crud
from worker.commands import Applied, command
from worker.errors import NotFound
from worker.schemas import CreateCommand, DeleteCommand, PostCreate, PostUpdate, UpdateCommand


@command("posts.create", CreateCommand, PostCreate)
def create(session: Session, command: CreateCommand, data: PostCreate) -> Applied:
    """Insert a post; tags named but missing are created."""
    post = crud.posts.create(session, data)
    return Applied("post", post.id, crud.posts.to_record(post))


@command("posts.update", UpdateCommand, PostUpdate)
def update(session: Session, command: UpdateCommand, data: PostUpdate) -> Applied:
    """Change the fields given; `tags` replaces the set."""
    post = crud.posts.get(session, command.id, for_update=True)
    if post is None:
        raise NotFound(f"post {command.id} does not exist")
    crud.check_version(post, command.expected_version)
    crud.posts.update(session, post, data)
    return Applied("post", post.id, crud.posts.to_record(post))


@command("posts.delete", DeleteCommand)
def delete(session: Session, command: DeleteCommand, data: None) -> Applied:
    """Delete the post and its tag links."""
    post = crud.posts.get(session, command.id, for_update=True)
    if post is None:
        raise NotFound(f"post {command.id} does not exist")
    crud.check_version(post, command.expected_version)
    record = crud.posts.to_record(post)
    crud.posts.delete(session, post)
    return Applied("post", command.id, record)
