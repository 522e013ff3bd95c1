"""The tables: users, posts, tags, post_tags, and the command ledger and dead letters."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DEAD_LETTER_REASONS = (
    "invalid",
    "not_found",
    "conflict",
    "stale",
    "retries_exhausted",
    "unknown_command",
    "undecodable",
)


class Base(DeclarativeBase):
    """Declarative base sharing one MetaData with a naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


post_tags = Table(
    "post_tags",
    Base.metadata,
    Column("post_id", ForeignKey("posts.id", ondelete="CASCADE"), primary_key=True),
    Column("tag_id", ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True, index=True),
)


class User(Base):
    """A user; email is unique without regard to case."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(50), unique=True)
    email: Mapped[str] = mapped_column(String(100))
    hashed_password: Mapped[str] = mapped_column(String(255))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True, server_default="true")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    posts: Mapped[list[Post]] = relationship(
        back_populates="author", passive_deletes=True, order_by="Post.id"
    )

    __mapper_args__: dict[str, Any] = {  # noqa: RUF012
        "version_id_col": version,
        "version_id_generator": False,
        "eager_defaults": True,
    }


# Email is unique without regard to case.
Index("uq_users_email_lower", func.lower(User.email), unique=True)


class Post(Base):
    """A post by one author, with any number of tags."""

    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    content: Mapped[str | None] = mapped_column(Text)
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    author: Mapped[User] = relationship(back_populates="posts")
    tags: Mapped[list[Tag]] = relationship(
        secondary=post_tags, back_populates="posts", passive_deletes=True, order_by="Tag.name"
    )

    __mapper_args__: dict[str, Any] = {  # noqa: RUF012
        "version_id_col": version,
        "version_id_generator": False,
        "eager_defaults": True,
    }


class Tag(Base):
    """A tag with a unique name."""

    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    posts: Mapped[list[Post]] = relationship(
        secondary=post_tags, back_populates="tags", passive_deletes=True
    )

    __mapper_args__: dict[str, Any] = {  # noqa: RUF012
        "version_id_col": version,
        "version_id_generator": False,
        "eager_defaults": True,
    }


class CommandRecord(Base):
    """The ledger: one row per applied command, written in the command's own transaction."""

    __tablename__ = "command_ledger"

    command_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    task: Mapped[str] = mapped_column(String(64))
    result: Mapped[dict[str, Any]] = mapped_column(JSONB)
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DeadLetter(Base):
    """A rejected or undeliverable command, kept (without secrets) for inspection and replay."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        CheckConstraint(
            "reason IN (" + ", ".join(f"'{reason}'" for reason in DEAD_LETTER_REASONS) + ")",
            name="reason",
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    command_id: Mapped[str | None] = mapped_column(String(128), index=True)
    task: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(String(32), index=True)
    error: Mapped[str] = mapped_column(Text)
    kwargs: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # The argon2id hash of the command's password, for replay: never in `kwargs`, never shown.
    password_hash: Mapped[str | None] = mapped_column(String(255))
    raw_body: Mapped[str | None] = mapped_column(Text)
    # A queue item that never became a command: its size, and its digest when no text is kept.
    raw_size: Mapped[int | None] = mapped_column(BigInteger)
    raw_sha256: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
