"""ORM tables of the metadata service: collections, items and their captions."""

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
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

STATUSES: Final = ("pending", "indexed", "failed")

# SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid alias), never a BIGINT one.
BigId = BigInteger().with_variant(Integer, "sqlite")
# JSONB on PostgreSQL: containment (@>) for filters and a GIN index; plain JSON text elsewhere.
JsonObject = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Collection(Base):
    __tablename__ = "collections"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (
        CheckConstraint(
            "status IN ({})".format(", ".join(f"'{s}'" for s in STATUSES)),
            name="ck_items_status",
        ),
        # Filters and counts always scope by collection and status together.
        Index("ix_items_collection_status", "collection", "status"),
        Index("ix_items_attributes", "attributes", postgresql_using="gin").ddl_if(
            dialect="postgresql"
        ),
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

    captions: Mapped[list[Caption]] = relationship(
        back_populates="item",
        order_by="Caption.position",
        cascade="all, delete-orphan",
        # The database's ON DELETE CASCADE removes captions; no ORM round trip for them.
        passive_deletes=True,
        lazy="selectin",
    )


class Caption(Base):
    __tablename__ = "captions"
    __table_args__ = (UniqueConstraint("item_id", "position", name="uq_captions_item_position"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(BigId, ForeignKey("items.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)

    item: Mapped[Item] = relationship(back_populates="captions")
