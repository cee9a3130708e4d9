"""Collection deletion as a job: ``collection_deletions`` (one row per deletion, its state and
progress) and ``collections.deletion_id`` (set while a collection is being deleted).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "collection_deletions",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("collection", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("items_left", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(
            "state IN ('dropping', 'purging', 'done')", name="ck_collection_deletions_state"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_collection_deletions_state", "collection_deletions", ["state"])
    op.add_column("collections", sa.Column("deletion_id", BigId))


def downgrade() -> None:
    with op.batch_alter_table("collections") as batch:
        batch.drop_column("deletion_id")
    op.drop_index("ix_collection_deletions_state", table_name="collection_deletions")
    op.drop_table("collection_deletions")
