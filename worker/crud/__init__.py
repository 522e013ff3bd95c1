"""Data access, one module per entity: functions take a Session and never commit."""

from worker.crud import posts, tags, users
from worker.crud.common import check_version, page

__all__ = ["check_version", "page", "posts", "tags", "users"]
