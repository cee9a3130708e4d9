"""ORM tables of the metadata service: collections, items, their captions and tags.

The schema itself is created and changed by the alembic migrations in ``migrations/``; these
classes must describe the same schema (a test compares the two on SQLite and PostgreSQL). The
full-text search objects are the one exception: SQLite's FTS5 tables and their triggers exist only
in the migrations (``FULL_TEXT_OBJECTS``), PostgreSQL's GIN expression indexes in both.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    literal_column,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

STATUSES: Final = ("pending", "indexed", "failed")

# SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid alias), never a BIGINT one.
BigId = BigInteger().with_variant(Integer, "sqlite")
# JSONB on PostgreSQL: containment (@>) for filters and a GIN index; plain JSON text elsewhere.
JsonObject = JSON().with_variant(JSONB(), "postgresql")

# The text search configuration of PostgreSQL's full-text indexes. 'simple' only lowercases (no
# stemming, no stop words), which matches SQLite FTS5's unicode61 tokenizer, so both databases
# find the same words. A constant, not a parameter: the planner uses an expression index only
# when the query repeats the indexed expression exactly.
PG_TEXT_CONFIG = literal_column("'simple'::regconfig")

# Created by the migrations on SQLite only; schema comparisons leave them out.
FULL_TEXT_OBJECTS: Final = frozenset({"captions_fts", "items_fts"})
# Indexes that exist on PostgreSQL only (GIN); schema comparisons on SQLite leave them out.
POSTGRESQL_ONLY_INDEXES: Final = frozenset(
    {"ix_items_attributes", "ix_items_search_text_fts", "ix_captions_text_fts"}
)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Collection(Base):
    __tablename__ = "collections"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The model whose vectors the collection holds: declared at creation, or taken from the first
    # item indexed into it. Vectors of two models are never mixed in one collection.
    model_id: Mapped[str | None] = mapped_column(String(256))
    # What the retrieval service should build for this collection, e.g. {"factory": "HNSW32"}.
    index_settings: Mapped[dict[str, Any]] = mapped_column(
        JsonObject, default=dict, server_default="{}"
    )
    description: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Set while the collection is being deleted (its CollectionDeletion): hidden from every
    # answer, its name kept until its rows are gone.
    deletion_id: Mapped[int | None] = mapped_column(BigId)


DELETION_STATES: Final = ("dropping", "purging", "done")


class CollectionDeletion(Base):
    """One deletion of a collection, a job in steps: ``dropping`` (the collection is hidden; its
    vectors are the retrieval service's to drop, which the gateway confirms), ``purging`` (this
    service deletes its items, captions and images in batches), ``done`` (the name is free)."""

    __tablename__ = "collection_deletions"
    __table_args__ = (
        CheckConstraint(
            "state IN ({})".format(", ".join(f"'{s}'" for s in DELETION_STATES)),
            name="ck_collection_deletions_state",
        ),
        Index("ix_collection_deletions_state", "state"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    collection: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    items: Mapped[int] = mapped_column(Integer)  # when the deletion started
    items_left: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (
        CheckConstraint(
            "status IN ({})".format(", ".join(f"'{s}'" for s in STATUSES)),
            name="ck_items_status",
        ),
        # Filters and counts always scope by collection and status together.
        Index("ix_items_collection_status", "collection", "status"),
        # "Is this image already in this collection?" on every upload.
        Index("ix_items_collection_sha256", "collection", "image_sha256"),
        Index("ix_items_attributes", "attributes", postgresql_using="gin").ddl_if(
            dialect="postgresql"
        ),
        Index(
            "ix_items_search_text_fts",
            func.to_tsvector(PG_TEXT_CONFIG, literal_column("search_text")),
            postgresql_using="gin",
        ).ddl_if(dialect="postgresql"),
        # Ids name vectors in the retrieval service: SQLite must never hand a deleted one out
        # again (without AUTOINCREMENT it reuses the highest). PostgreSQL sequences never do.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    collection: Mapped[str] = mapped_column(ForeignKey("collections.name"))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attributes: Mapped[dict[str, Any]] = mapped_column(JsonObject, default=dict)
    # Indexed: deleting an item asks whether any other item still uses the image file.
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    content_type: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    # Where the image came from (a file: or https: URI), as the ingesting client said.
    source_uri: Mapped[str | None] = mapped_column(String(2048))
    # The model that produced the item's vectors, set when it is marked indexed.
    model_id: Mapped[str | None] = mapped_column(String(256))
    # The reason of the last failure, and how many times indexing failed.
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    indexed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Captions and tags as one text: what keyword search over items matches. Kept by the
    # repository on every write of captions or tags.
    search_text: Mapped[str] = mapped_column(Text, default="", server_default="")

    captions: Mapped[list[Caption]] = relationship(
        back_populates="item",
        order_by="Caption.position",
        cascade="all, delete-orphan",
        # The database's ON DELETE CASCADE removes captions; no ORM round trip for them.
        passive_deletes=True,
        lazy="selectin",
    )
    tag_rows: Mapped[list[ItemTag]] = relationship(
        order_by="ItemTag.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="selectin",
    )

    @property
    def tags(self) -> list[str]:
        return [row.tag for row in self.tag_rows]


class Caption(Base):
    __tablename__ = "captions"
    __table_args__ = (
        UniqueConstraint("item_id", "position", name="uq_captions_item_position"),
        Index(
            "ix_captions_text_fts",
            func.to_tsvector(PG_TEXT_CONFIG, literal_column("text")),
            postgresql_using="gin",
        ).ddl_if(dialect="postgresql"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(BigId, ForeignKey("items.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)

    item: Mapped[Item] = relationship(back_populates="captions")


class ItemTag(Base):
    """One tag of one item. A table rather than a JSON list: "has tag x" is an indexed lookup
    on both databases, with the same SQL."""

    __tablename__ = "item_tags"
    __table_args__ = (Index("ix_item_tags_tag", "tag", "item_id"),)

    item_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("items.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Tags come back in the order they were given.
    position: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
