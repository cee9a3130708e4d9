"""The schema as the service created it before migrations existed (``create_all``).

A database made by that older code has these tables but no ``alembic_version``; the service
stamps it at this revision and upgrades it from here (see ``services.metadata.db.upgrade``).

Revision ID: 0001
Revises:
Create Date: 2025-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonObject = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "collections",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "items",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("collection", sa.String(64), sa.ForeignKey("collections.name"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attributes", JsonObject, nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('pending', 'indexed', 'failed')", name="ck_items_status"),
    )
    op.create_index("ix_items_collection_status", "items", ["collection", "status"])
    op.create_index("ix_items_image_sha256", "items", ["image_sha256"])
    if op.get_bind().dialect.name == "postgresql":
        op.create_index("ix_items_attributes", "items", ["attributes"], postgresql_using="gin")
    op.create_table(
        "captions",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("item_id", BigId, sa.ForeignKey("items.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.UniqueConstraint("item_id", "position", name="uq_captions_item_position"),
    )


def downgrade() -> None:
    op.drop_table("captions")
    op.drop_table("items")
    op.drop_table("collections")
