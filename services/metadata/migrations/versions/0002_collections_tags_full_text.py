"""Issue 6: collection settings, item provenance and failure tracking, tags, full-text search.

- collections: model_id, index_settings, description, updated_at;
- items: source_uri, model_id, error, attempts, indexed_at, search_text (captions + tags, the
  document keyword search matches) and an index on (collection, image_sha256) for duplicate checks;
- SQLite: items and captions become AUTOINCREMENT tables, so a deleted row's id is never handed
  out again (ids name vectors in the retrieval service; reuse would alias stale vectors). SQLite
  cannot change this in place: both tables are rebuilt, with foreign keys off (see db.upgrade);
- item_tags;
- full text: SQLite FTS5 tables kept in step by triggers; PostgreSQL GIN expression indexes.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonObject = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

# External-content FTS5 tables: the text lives once, in captions/items; the triggers keep the
# index in step with every insert, update and delete (ON DELETE CASCADE deletes included).
_SQLITE_FULL_TEXT = [
    "CREATE VIRTUAL TABLE captions_fts USING fts5("
    "text, content='captions', content_rowid='id', tokenize='unicode61 remove_diacritics 2')",
    "CREATE TRIGGER captions_fts_insert AFTER INSERT ON captions BEGIN "
    "INSERT INTO captions_fts(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER captions_fts_delete AFTER DELETE ON captions BEGIN "
    "INSERT INTO captions_fts(captions_fts, rowid, text) VALUES ('delete', old.id, old.text); END",
    "CREATE TRIGGER captions_fts_update AFTER UPDATE OF text ON captions BEGIN "
    "INSERT INTO captions_fts(captions_fts, rowid, text) VALUES ('delete', old.id, old.text); "
    "INSERT INTO captions_fts(rowid, text) VALUES (new.id, new.text); END",
    "INSERT INTO captions_fts(captions_fts) VALUES ('rebuild')",
    "CREATE VIRTUAL TABLE items_fts USING fts5("
    "search_text, content='items', content_rowid='id', tokenize='unicode61 remove_diacritics 2')",
    "CREATE TRIGGER items_fts_insert AFTER INSERT ON items BEGIN "
    "INSERT INTO items_fts(rowid, search_text) VALUES (new.id, new.search_text); END",
    "CREATE TRIGGER items_fts_delete AFTER DELETE ON items BEGIN "
    "INSERT INTO items_fts(items_fts, rowid, search_text) "
    "VALUES ('delete', old.id, old.search_text); END",
    "CREATE TRIGGER items_fts_update AFTER UPDATE OF search_text ON items BEGIN "
    "INSERT INTO items_fts(items_fts, rowid, search_text) "
    "VALUES ('delete', old.id, old.search_text); "
    "INSERT INTO items_fts(rowid, search_text) VALUES (new.id, new.search_text); END",
    "INSERT INTO items_fts(items_fts) VALUES ('rebuild')",
]
_BACKFILL_SQLITE = (
    "UPDATE items SET search_text = COALESCE((SELECT group_concat(text, ' ') "
    "FROM captions WHERE captions.item_id = items.id), '')"
)
_BACKFILL_PG = (
    "UPDATE items SET search_text = COALESCE((SELECT string_agg(text, ' ') "
    "FROM captions WHERE captions.item_id = items.id), '')"
)
_SQLITE_FULL_TEXT_DROP = [
    "DROP TRIGGER IF EXISTS items_fts_update",
    "DROP TRIGGER IF EXISTS items_fts_delete",
    "DROP TRIGGER IF EXISTS items_fts_insert",
    "DROP TABLE IF EXISTS items_fts",
    "DROP TRIGGER IF EXISTS captions_fts_update",
    "DROP TRIGGER IF EXISTS captions_fts_delete",
    "DROP TRIGGER IF EXISTS captions_fts_insert",
    "DROP TABLE IF EXISTS captions_fts",
]


# The two tables as revision 0001 made them: what SQLite's rebuild copies from (reflection alone
# would lose the CHECK constraint).
_legacy = sa.MetaData()
_LEGACY_ITEMS = sa.Table(
    "items",
    _legacy,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("collection", sa.String(64), sa.ForeignKey("collections.name"), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attributes", JsonObject, nullable=False),
    sa.Column("image_sha256", sa.String(64), nullable=False),
    sa.Column("content_type", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'indexed', 'failed')", name="ck_items_status"),
    sa.Index("ix_items_collection_status", "collection", "status"),
    sa.Index("ix_items_image_sha256", "image_sha256"),
)
_LEGACY_CAPTIONS = sa.Table(
    "captions",
    _legacy,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("item_id", BigId, sa.ForeignKey("items.id", ondelete="CASCADE"), nullable=False),
    sa.Column("position", sa.Integer(), nullable=False),
    sa.Column("text", sa.Text(), nullable=False),
    sa.UniqueConstraint("item_id", "position", name="uq_captions_item_position"),
)


def _rebuild(dialect: str, table: sa.Table) -> object:
    if dialect != "sqlite":
        return op.batch_alter_table(table.name)
    return op.batch_alter_table(
        table.name,
        copy_from=table,
        recreate="always",
        table_kwargs={"sqlite_autoincrement": True},
    )


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.add_column("collections", sa.Column("model_id", sa.String(256)))
    op.add_column(
        "collections",
        sa.Column("index_settings", JsonObject, nullable=False, server_default="{}"),
    )
    op.add_column("collections", sa.Column("description", sa.Text()))
    op.add_column("collections", sa.Column("updated_at", sa.DateTime(timezone=True)))

    with _rebuild(dialect, _LEGACY_ITEMS) as items:  # type: ignore[attr-defined]
        items.add_column(sa.Column("source_uri", sa.String(2048)))
        items.add_column(sa.Column("model_id", sa.String(256)))
        items.add_column(sa.Column("error", sa.Text()))
        items.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        items.add_column(sa.Column("indexed_at", sa.DateTime(timezone=True)))
        items.add_column(sa.Column("search_text", sa.Text(), nullable=False, server_default=""))
        items.create_index("ix_items_collection_sha256", ["collection", "image_sha256"])
    if dialect == "sqlite":
        with _rebuild(dialect, _LEGACY_CAPTIONS):  # type: ignore[attr-defined]
            pass

    op.create_table(
        "item_tags",
        sa.Column(
            "item_id",
            BigId,
            sa.ForeignKey("items.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("tag", sa.String(64), primary_key=True),
        sa.Column("position", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index("ix_item_tags_tag", "item_tags", ["tag", "item_id"])

    # Items written before this revision: their captions become their search text.
    op.execute(sa.text(_BACKFILL_PG if dialect == "postgresql" else _BACKFILL_SQLITE))
    if dialect == "sqlite":
        for statement in _SQLITE_FULL_TEXT:
            op.execute(sa.text(statement))
    elif dialect == "postgresql":
        op.execute(
            sa.text(
                "CREATE INDEX ix_items_search_text_fts ON items "
                "USING gin (to_tsvector('simple'::regconfig, search_text))"
            )
        )
        op.execute(
            sa.text(
                "CREATE INDEX ix_captions_text_fts ON captions "
                "USING gin (to_tsvector('simple'::regconfig, text))"
            )
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for statement in _SQLITE_FULL_TEXT_DROP:
            op.execute(sa.text(statement))
    elif dialect == "postgresql":
        op.drop_index("ix_captions_text_fts", table_name="captions")
        op.drop_index("ix_items_search_text_fts", table_name="items")
    op.drop_index("ix_item_tags_tag", table_name="item_tags")
    op.drop_table("item_tags")
    op.drop_index("ix_items_collection_sha256", table_name="items")
    with op.batch_alter_table("items") as batch:
        for column in ("search_text", "indexed_at", "attempts", "error", "model_id", "source_uri"):
            batch.drop_column(column)
    with op.batch_alter_table("collections") as batch:
        for column in ("updated_at", "description", "index_settings", "model_id"):
            batch.drop_column(column)
