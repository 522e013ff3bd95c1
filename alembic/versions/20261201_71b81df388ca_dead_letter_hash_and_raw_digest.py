"""dead letters: the password hash in its own column, the raw item's size and digest

Revision ID: 71b81df388ca
Revises: 0739f195120b
Create Date: 2026-12-01 22:06:02.000000

A dead letter used to keep a password's hash inside `kwargs` (`data.password_hash`), which
`dead-letters list --json` printed and a replay published as a producer field. The hash moves
to its own column, never printed, and `kwargs` shows `"password": "[redacted]"` instead, as
the worker now writes it. `raw_size` and `raw_sha256` describe a queue item kept without its
text (not JSON, or over the size limit).
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "71b81df388ca"
down_revision: str | Sequence[str] | None = "0739f195120b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("dead_letters", sa.Column("password_hash", sa.String(length=255), nullable=True))
    op.add_column("dead_letters", sa.Column("raw_size", sa.BigInteger(), nullable=True))
    op.add_column("dead_letters", sa.Column("raw_sha256", sa.Text(), nullable=True))
    # Dead letters written before: their hash leaves `kwargs` for its column.
    op.execute(
        "UPDATE dead_letters "
        "SET password_hash = kwargs -> 'data' ->> 'password_hash', "
        "kwargs = jsonb_set(kwargs #- '{data,password_hash}', '{data,password}', "
        "'\"[redacted]\"') "
        "WHERE jsonb_typeof(kwargs -> 'data') = 'object' "
        "AND jsonb_typeof(kwargs -> 'data' -> 'password_hash') = 'string'"
    )


def downgrade() -> None:
    """Downgrade schema."""
    # Back where the previous code reads it (and replays it from).
    op.execute(
        "UPDATE dead_letters "
        "SET kwargs = jsonb_set(kwargs #- '{data,password}', '{data,password_hash}', "
        "to_jsonb(password_hash)) "
        "WHERE password_hash IS NOT NULL AND jsonb_typeof(kwargs -> 'data') = 'object'"
    )
    op.drop_column("dead_letters", "raw_sha256")
    op.drop_column("dead_letters", "raw_size")
    op.drop_column("dead_letters", "password_hash")
