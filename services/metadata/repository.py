"""The metadata domain: items, captions, collections and attribute filters over SQLAlchemy
(sync; the HTTP layer calls it from worker threads) plus the content-addressed image store."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Gauge
from sqlalchemy import ColumnElement, Engine, and_, delete, func, or_, select, type_coerce, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import sessionmaker

from services.metadata.images import ImageStore, check_image
from services.metadata.models import STATUSES, Caption, Collection, Item, utcnow
from services.metadata.schemas import (
    CaptionOut,
    CaptionRef,
    CollectionOut,
    FilterOut,
    ItemOut,
)
from services.metadata.settings import MetadataSettings
from services.metadata.validation import (
    Scalar,
    check_captions,
    check_collection_name,
    is_collection_name,
    parse_attributes,
    parse_filters,
)
from shared.problems import NotFound, ProblemError

log = logging.getLogger(__name__)

ITEMS = Gauge(
    "metadata_items",
    "Items per collection and status, as of this replica's last write.",
    ["collection", "status"],
)

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _is_int64(value: int) -> bool:
    # Larger ids cannot exist, and SQLite refuses to even bind them.
    return _INT64_MIN <= value <= _INT64_MAX


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything is stored in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _item_view(item: Item) -> ItemOut:
    return ItemOut(
        id=item.id,
        collection=item.collection,
        captions=[CaptionOut(id=c.id, text=c.text) for c in item.captions],
        attributes=item.attributes,
        status=item.status,  # type: ignore[arg-type]  # the CHECK constraint keeps it valid
        image_sha256=item.image_sha256,
        content_type=item.content_type,
        created_at=_utc(item.created_at),
        updated_at=_utc(item.updated_at),
    )


def item_not_found(item_id: int) -> NotFound:
    return NotFound(f"item {item_id} does not exist", code="item_not_found")


def collection_not_found(name: str) -> NotFound:
    return NotFound(f"collection {name[:80]!r} does not exist", code="collection_not_found")


@dataclass(frozen=True)
class StoredImage:
    path: Path
    sha256: str
    content_type: str


class Repository:
    def __init__(self, engine: Engine, images: ImageStore, settings: MetadataSettings) -> None:
        self.engine = engine
        self.images = images
        self.settings = settings
        self.dialect = engine.dialect.name
        self._session = sessionmaker(engine, expire_on_commit=False)

    def ping(self) -> None:
        with self._session() as session:
            session.execute(select(1))

    # --- items ----------------------------------------------------------------------------

    def create_item(
        self,
        collection: str,
        captions: list[str],
        attributes: str | None,
        image_data: bytes,
    ) -> ItemOut:
        """Check the upload, store the image (once per content) and the item, pending, in
        ``collection`` (created on first use). ``attributes`` is the JSON object text."""
        limits = self.settings
        collection = check_collection_name(collection)
        captions = check_captions(
            captions, max_captions=limits.max_captions, max_chars=limits.max_caption_chars
        )
        attribute_values = parse_attributes(attributes)
        # The cheap checks above run first; decoding the image header is the costly one.
        image = check_image(
            image_data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
        )
        now = utcnow()
        # Held across "write file + commit the row" so a concurrent delete of the last item using
        # the same bytes cannot remove the file between the two.
        with self.images.lock(image.sha256):
            wrote = self.images.put(image.sha256, image.data)
            try:
                with self._session.begin() as session:
                    # Written first: the transaction starts with a write, so SQLite takes its write
                    # lock up front (waiting on busy_timeout) instead of failing to upgrade later.
                    session.execute(self._insert_collection(collection, now))
                    item = Item(
                        collection=collection,
                        status="pending",
                        attributes=attribute_values,
                        image_sha256=image.sha256,
                        content_type=image.content_type,
                        created_at=now,
                        updated_at=now,
                        captions=[Caption(position=i, text=t) for i, t in enumerate(captions)],
                    )
                    session.add(item)
                    session.flush()
                    view = _item_view(item)
            except BaseException:
                if wrote:  # nothing else can reference a file this call just created
                    self.images.remove(image.sha256)
                raise
        self.refresh_gauge(collection)
        return view

    def _insert_collection(self, name: str, now: datetime) -> Any:
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        # ON CONFLICT DO NOTHING: two first uploads to a new collection must not race to a 500.
        return (
            insert(Collection)
            .values(name=name, created_at=now)
            .on_conflict_do_nothing(index_elements=["name"])
        )

    def get_item(self, item_id: int) -> ItemOut:
        if not _is_int64(item_id):
            raise item_not_found(item_id)
        with self._session() as session:
            item = session.get(Item, item_id)
            if item is None:
                raise item_not_found(item_id)
            return _item_view(item)

    def image(self, item_id: int) -> StoredImage:
        if not _is_int64(item_id):
            raise item_not_found(item_id)
        with self._session() as session:
            row = session.execute(
                select(Item.image_sha256, Item.content_type).where(Item.id == item_id)
            ).first()
        if row is None:
            raise item_not_found(item_id)
        path = self.images.path(row.image_sha256)
        if not path.is_file():
            # The row says the file exists: its absence is data loss, not a caller error.
            raise ProblemError(f"the image of item {item_id} is missing", code="image_missing")
        return StoredImage(path, row.image_sha256, row.content_type)

    def set_status(self, item_id: int, status: str) -> ItemOut:
        if not _is_int64(item_id):
            raise item_not_found(item_id)
        with self._session.begin() as session:
            result = session.execute(
                update(Item)
                .where(Item.id == item_id)
                .values(status=status, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise item_not_found(item_id)
            item = session.get(Item, item_id)
            assert item is not None  # updated just above, in this transaction
            view = _item_view(item)
        self.refresh_gauge(view.collection)
        return view

    def delete_item(self, item_id: int) -> None:
        """Delete the item (its captions go by ON DELETE CASCADE), then its image file if no
        other item uses the same bytes."""
        if not _is_int64(item_id):
            raise item_not_found(item_id)
        with self._session.begin() as session:
            row = session.execute(
                delete(Item)
                .where(Item.id == item_id)
                .returning(Item.image_sha256, Item.collection)
                .execution_options(synchronize_session=False)
            ).first()
        if row is None:
            raise item_not_found(item_id)
        sha256, collection = row
        with self.images.lock(sha256), self._session() as session:
            in_use = session.scalar(select(Item.id).where(Item.image_sha256 == sha256).limit(1))
            if in_use is None:
                self.images.remove(sha256)
        self.refresh_gauge(collection)

    def lookup_items(self, ids: list[int]) -> list[ItemOut]:
        """Existing items among ``ids``, in request order, each once."""
        wanted = list(dict.fromkeys(i for i in ids if _is_int64(i)))
        if not wanted:
            return []
        with self._session() as session:
            found = {
                item.id: item for item in session.scalars(select(Item).where(Item.id.in_(wanted)))
            }
            return [_item_view(found[i]) for i in wanted if i in found]

    def lookup_captions(self, ids: list[int]) -> list[CaptionRef]:
        """Existing captions among ``ids``, in request order, each once."""
        wanted = list(dict.fromkeys(i for i in ids if _is_int64(i)))
        if not wanted:
            return []
        with self._session() as session:
            rows = session.execute(
                select(Caption.id, Caption.item_id, Caption.text).where(Caption.id.in_(wanted))
            )
            found = {
                row.id: CaptionRef(id=row.id, item_id=row.item_id, text=row.text) for row in rows
            }
        return [found[i] for i in wanted if i in found]

    # --- collections and filters -------------------------------------------------------------

    def filter_items(self, collection: str, raw_filters: Any) -> FilterOut:
        """Indexed items of ``collection`` (and their captions) whose attributes equal one of the
        listed values for every key: the allow-list a search runs against."""
        filters = parse_filters(raw_filters)
        with self._session() as session:
            if not is_collection_name(collection) or session.get(Collection, collection) is None:
                raise collection_not_found(collection)
            conditions = [Item.collection == collection, Item.status == "indexed"]
            conditions += [
                or_(*(self._attribute_equals(key, value) for value in values))
                for key, values in filters.items()
            ]
            item_ids = session.scalars(select(Item.id).where(*conditions).order_by(Item.id)).all()
            caption_ids = session.scalars(
                select(Caption.id)
                .join(Item, Caption.item_id == Item.id)
                .where(*conditions)
                .order_by(Caption.id)
            ).all()
        return FilterOut(item_ids=list(item_ids), caption_ids=list(caption_ids))

    def _attribute_equals(self, key: str, value: Scalar) -> ColumnElement[bool]:
        """``attributes[key] == value`` with JSON types respected (1 == 1.0, but "1" != 1 and
        true != 1), as bound parameters on both dialects."""
        if self.dialect == "postgresql":
            # JSONB containment compares numbers numerically and uses the GIN index.
            return type_coerce(Item.attributes, JSONB).contains({key: value})
        # SQLite: json_type tells null/true/false/integer/real/text apart, which json_extract
        # alone cannot (it returns 1 for both true and 1, and NULL for both null and missing).
        path = f'$."{key}"'  # safe: keys are checked against ATTRIBUTE_KEY
        kind = func.json_type(Item.attributes, path)
        if value is None:
            return kind == "null"
        if isinstance(value, bool):
            return kind == ("true" if value else "false")
        extracted = func.json_extract(Item.attributes, path)
        if isinstance(value, int | float):
            return and_(kind.in_(("integer", "real")), extracted == value)
        return and_(kind == "text", extracted == value)

    def get_collection(self, name: str) -> CollectionOut:
        if not is_collection_name(name):
            raise collection_not_found(name)
        with self._session() as session:
            if session.get(Collection, name) is None:
                raise collection_not_found(name)
            count = session.scalar(
                select(func.count(Item.id)).where(Item.collection == name, Item.status == "indexed")
            )
        return CollectionOut(name=name, items=count or 0)

    def list_collections(self) -> list[CollectionOut]:
        with self._session() as session:
            rows = session.execute(
                select(Collection.name, func.count(Item.id))
                .outerjoin(Item, and_(Item.collection == Collection.name, Item.status == "indexed"))
                .group_by(Collection.name)
                .order_by(Collection.name)
            ).all()
        return [CollectionOut(name=name, items=count) for name, count in rows]

    # --- metrics ----------------------------------------------------------------------------

    def refresh_gauge(self, collection: str | None = None) -> None:
        """Set ``metadata_items`` from the database for one collection, or all of them."""
        try:
            with self._session() as session:
                names_query = select(Collection.name)
                counts_query = select(Item.collection, Item.status, func.count(Item.id)).group_by(
                    Item.collection, Item.status
                )
                if collection is not None:
                    names_query = names_query.where(Collection.name == collection)
                    counts_query = counts_query.where(Item.collection == collection)
                names = session.scalars(names_query).all()
                counts = {(c, s): n for c, s, n in session.execute(counts_query)}
        except Exception:
            # The write already committed; a stale gauge must not turn it into an error.
            log.warning("could not refresh the metadata_items gauge", exc_info=True)
            return
        for name in names:
            for status in STATUSES:
                ITEMS.labels(name, status).set(counts.get((name, status), 0))
