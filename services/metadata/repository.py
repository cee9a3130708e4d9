"""The metadata domain: collections, items, captions, tags, filters and keyword search over
SQLAlchemy (sync; the HTTP layer calls it from worker threads) plus the content-addressed image
store with its thumbnails.

Duplicate policy (docs/metadata.md): within one collection an image is stored once, identified by
the SHA-256 of its bytes. Uploading bytes the collection already holds answers 409
``duplicate_item`` when that item is indexed and 409 ``duplicate_pending`` while it is pending
(being indexed, or stuck until ``crossmodal reconcile`` repairs it); when that item has failed, the
upload is its retry: the item keeps its id, takes the new captions, tags and attributes, and is
pending again. What a duplicate brings is added to the indexed item by ``merge_item``: its new
captions and tags, and the attributes the item lacks (the item's own values win a conflict).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Gauge
from pydantic_core import to_json
from sqlalchemy import Connection, Engine, bindparam, delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from services.metadata.filters import compile_filter, parse_filter
from services.metadata.fulltext import keyword_select, query_terms
from services.metadata.images import (
    THUMBNAIL_CONTENT_TYPE,
    CheckedImage,
    ImageStore,
    check_image,
    make_thumbnail,
)
from services.metadata.models import (
    STATUSES,
    Caption,
    Collection,
    CollectionDeletion,
    Item,
    ItemTag,
    utcnow,
)
from services.metadata.settings import MetadataSettings
from services.metadata.validation import (
    MAX_ATTRIBUTES,
    MAX_TAGS,
    check_attributes,
    check_captions,
    check_collection_name,
    check_source_uri,
    check_tags,
    is_collection_name,
    parse_attributes,
    same_value,
)
from shared.contracts.metadata import (
    AttributeConflict,
    CaptionOut,
    CaptionRef,
    CollectionCreate,
    CollectionOut,
    FilterOut,
    HashMatch,
    IndexSettings,
    ItemMerge,
    ItemMerged,
    ItemOut,
    ItemState,
    ItemStatesOut,
    KeywordHit,
    StatusCounts,
    caption_key,
)
from shared.contracts.metadata import (
    CollectionDeletion as CollectionDeletionOut,
)
from shared.problems import Conflict, NotFound, ProblemError

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


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


def _item_view(item: Item) -> ItemOut:
    return ItemOut(
        id=item.id,
        collection=item.collection,
        captions=[CaptionOut(id=c.id, text=c.text) for c in item.captions],
        attributes=item.attributes,
        tags=item.tags,
        status=item.status,  # type: ignore[arg-type]  # the CHECK constraint keeps it valid
        image_sha256=item.image_sha256,
        content_type=item.content_type,
        source_uri=item.source_uri,
        model_id=item.model_id,
        error=item.error,
        attempts=item.attempts,
        created_at=_utc(item.created_at),
        updated_at=_utc(item.updated_at),
        indexed_at=_utc_or_none(item.indexed_at),
    )


# The queries behind POST /collections/{collection}/hits, on every uncached search: built once,
# compiled once per dialect (SQLAlchemy caches them), returning plain rows.
_NO_HITS = b'{"hits":[]}'
_CAPTIONS_BY_ID = select(Caption.id, Caption.item_id, Caption.text).where(
    Caption.id.in_(bindparam("ids", expanding=True))
)
_INDEXED_ITEMS = select(
    Item.id,
    Item.collection,
    Item.attributes,
    Item.status,
    Item.image_sha256,
    Item.content_type,
    Item.source_uri,
    Item.model_id,
    Item.error,
    Item.attempts,
    Item.created_at,
    Item.updated_at,
    Item.indexed_at,
).where(
    Item.id.in_(bindparam("ids", expanding=True)),
    Item.collection == bindparam("collection"),
    Item.status == "indexed",
    # Not of a collection being deleted: it is gone from answers from the deletion's start.
    Item.collection.in_(
        select(Collection.name).where(
            Collection.name == bindparam("collection"), Collection.deletion_id.is_(None)
        )
    ),
)
_VISIBLE_COLLECTION = select(Collection.name).where(
    Collection.name == bindparam("collection"), Collection.deletion_id.is_(None)
)
_ITEM_CAPTIONS = (
    select(Caption.item_id, Caption.id, Caption.text)
    .where(Caption.item_id.in_(bindparam("ids", expanding=True)))
    .order_by(Caption.item_id, Caption.position)
)
_ITEM_TAGS = (
    select(ItemTag.item_id, ItemTag.tag)
    .where(ItemTag.item_id.in_(bindparam("ids", expanding=True)))
    .order_by(ItemTag.item_id, ItemTag.position)
)


def _search_text(captions: list[str], tags: list[str]) -> str:
    return "\n".join([*captions, " ".join(tags)]).strip()


def item_not_found(item_id: int) -> NotFound:
    return NotFound(f"item {item_id} does not exist", code="item_not_found")


def collection_not_found(name: str) -> NotFound:
    return NotFound(f"collection {name[:80]!r} does not exist", code="collection_not_found")


def collection_being_deleted(name: str) -> Conflict:
    # Its name is free once its rows are gone: seconds for thousands of items.
    return Conflict(
        f"collection {name!r} is being deleted; its name is free once that is done",
        code="collection_being_deleted",
        headers={"Retry-After": "1"},
    )


def _deletion_view(job: CollectionDeletion) -> CollectionDeletionOut:
    return CollectionDeletionOut(
        id=job.id,
        collection=job.collection,
        state=job.state,  # type: ignore[arg-type]
        items=job.items,
        items_left=job.items_left,
        started_at=_utc(job.started_at),
        updated_at=_utc(job.updated_at),
        finished_at=_utc(job.finished_at) if job.finished_at else None,
    )


def _lock_key(*parts: str) -> int:
    # A signed 64-bit key for pg_advisory_xact_lock.
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True)
class StoredImage:
    path: Path
    etag: str
    content_type: str


@dataclass(frozen=True)
class NewItem:
    """A checked upload, ready to store."""

    collection: str
    captions: list[str]
    tags: list[str]
    attributes: dict[str, Any]
    source_uri: str | None
    image: CheckedImage


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

    def check_upload(
        self,
        collection: str,
        captions: list[str],
        attributes: str | None,
        image_data: bytes,
        *,
        tags: list[str] | None = None,
        source_uri: str | None = None,
    ) -> NewItem:
        limits = self.settings
        collection = check_collection_name(collection)
        captions = check_captions(
            captions, max_captions=limits.max_captions, max_chars=limits.max_caption_chars
        )
        checked_tags = check_tags(tags or [])
        attribute_values = parse_attributes(attributes)
        uri = check_source_uri(source_uri)
        # The cheap checks above run first; decoding the image header is the costly one.
        image = check_image(
            image_data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
        )
        return NewItem(collection, captions, checked_tags, attribute_values, uri, image)

    def create_item(
        self,
        collection: str,
        captions: list[str],
        attributes: str | None,
        image_data: bytes,
        *,
        tags: list[str] | None = None,
        source_uri: str | None = None,
    ) -> ItemOut:
        """Check the upload, store the image (once per content) and its thumbnail, and the item,
        pending, in ``collection`` (created on first use). ``attributes`` is the JSON object
        text. Follows the duplicate policy of this module's docstring."""
        new = self.check_upload(
            collection, captions, attributes, image_data, tags=tags, source_uri=source_uri
        )
        sha256 = new.image.sha256
        size = self.settings.thumbnail_size
        # Decoding is the slow part: done once per content, outside every lock.
        thumbnail = None
        if not self.images.thumbnail_path(sha256, size).exists():
            thumbnail = make_thumbnail(new.image.data, size)
        now = utcnow()
        # Held across "write file + commit the row" so a concurrent delete of the last item using
        # the same bytes cannot remove the file between the two.
        with self.images.lock(sha256):
            wrote = self.images.put(sha256, new.image.data)
            if thumbnail is not None:
                self.images.put_thumbnail(sha256, size, thumbnail)
            try:
                with self._session.begin() as session:
                    view = self._store_item(session, new, now)
            except BaseException:
                if wrote:  # nothing else can reference a file this call just created
                    self.images.remove(sha256)
                raise
        self.refresh_gauge(new.collection)
        return view

    def _store_item(self, session: Session, new: NewItem, now: datetime) -> ItemOut:
        # Written first: the transaction starts with a write, so SQLite takes its write lock up
        # front (waiting on busy_timeout): the duplicate check below cannot race another writer.
        session.execute(self._insert_collection(new.collection, now))
        if session.scalar(select(Collection.deletion_id).where(Collection.name == new.collection)):
            raise collection_being_deleted(new.collection)
        if self.dialect == "postgresql":
            # PostgreSQL: one upload of given bytes per collection at a time, across replicas.
            session.execute(
                text("SELECT pg_advisory_xact_lock(:key)"),
                {"key": _lock_key(new.collection, new.image.sha256)},
            )
        existing = session.scalars(
            select(Item)
            .where(Item.collection == new.collection, Item.image_sha256 == new.image.sha256)
            .order_by(Item.id)
            .limit(1)
        ).first()
        search_text = _search_text(new.captions, new.tags)
        if existing is not None and existing.status != "failed":
            indexed = existing.status == "indexed"
            raise Conflict(
                f"this image is already item {existing.id} of collection {new.collection!r}"
                + ("" if indexed else ", still being indexed"),
                code="duplicate_item" if indexed else "duplicate_pending",
                # "status" is the problem body's HTTP status: the item's goes by another name.
                extra={"item_id": existing.id, "item_status": existing.status},
            )
        if existing is not None:
            # A retry of a failed item: same id, the new captions, tags and attributes.
            session.execute(delete(Caption).where(Caption.item_id == existing.id))
            session.execute(delete(ItemTag).where(ItemTag.item_id == existing.id))
            session.expire(existing, ["captions", "tag_rows"])
            existing.status = "pending"
            existing.attributes = new.attributes
            existing.source_uri = new.source_uri
            existing.search_text = search_text
            existing.updated_at = now
            item = existing
            session.flush()
            session.add_all(
                Caption(item_id=item.id, position=i, text=t) for i, t in enumerate(new.captions)
            )
            session.add_all(
                ItemTag(item_id=item.id, position=i, tag=t) for i, t in enumerate(new.tags)
            )
            session.flush()
            session.refresh(item, ["captions", "tag_rows"])
        else:
            item = Item(
                collection=new.collection,
                status="pending",
                attributes=new.attributes,
                image_sha256=new.image.sha256,
                content_type=new.image.content_type,
                source_uri=new.source_uri,
                search_text=search_text,
                attempts=0,
                created_at=now,
                updated_at=now,
                captions=[Caption(position=i, text=t) for i, t in enumerate(new.captions)],
                tag_rows=[ItemTag(position=i, tag=t) for i, t in enumerate(new.tags)],
            )
            session.add(item)
            session.flush()
        return _item_view(item)

    def merge_item(self, item_id: int, merge: ItemMerge) -> ItemMerged:
        """Add what a duplicate of an indexed item brings: captions it lacks (``caption_key``
        tells two apart), appended; tags it lacks, appended; attributes whose keys it lacks. A key
        it has with another value keeps the item's value and is reported as a conflict. Past an
        item's limits (captions, tags, attributes) nothing changes: 409 ``item_limit``. Only an
        indexed item takes a merge (409 ``item_not_indexed`` otherwise, with ``item_status``):
        a pending one may still fail, and a failed one takes the captions of its retry."""
        if not _is_int64(item_id):
            raise item_not_found(item_id)
        limits = self.settings
        captions = check_captions(
            merge.captions, max_captions=limits.max_captions, max_chars=limits.max_caption_chars
        )
        tags = check_tags(merge.tags)
        attributes = check_attributes(merge.attributes)
        now = utcnow()
        with self._session.begin() as session:
            item = self._locked_item(session, item_id)
            if not self._visible(session, item.collection):
                raise item_not_found(item_id)  # its collection is being deleted
            if item.status != "indexed":
                raise Conflict(
                    f"item {item_id} is {item.status}: only an indexed item takes a merge"
                    + (", try again once it is indexed" if item.status == "pending" else ""),
                    code="item_not_indexed",
                    extra={"item_id": item_id, "item_status": item.status},
                )
            known = {caption_key(c.text) for c in item.captions}
            new_captions = []
            for caption in captions:
                if caption_key(caption) not in known:
                    known.add(caption_key(caption))
                    new_captions.append(caption)
            new_tags = [t for t in tags if t not in item.tags]
            new_keys = [k for k in attributes if k not in item.attributes]
            conflicts = [
                AttributeConflict(key=k, kept=item.attributes[k], offered=v)
                for k, v in attributes.items()
                if k in item.attributes and not same_value(item.attributes[k], v)
            ]
            for what, count, limit in (
                ("captions", len(item.captions) + len(new_captions), limits.max_captions),
                ("tags", len(item.tags) + len(new_tags), MAX_TAGS),
                ("attributes", len(item.attributes) + len(new_keys), MAX_ATTRIBUTES),
            ):
                if count > limit:
                    raise Conflict(
                        f"item {item_id} would have {count} {what}, and an item has at most "
                        f"{limit}: nothing was merged",
                        code="item_limit",
                        extra={"item_id": item_id},
                    )
            if new_captions or new_tags or new_keys:
                after = max((c.position for c in item.captions), default=-1) + 1
                added = [
                    Caption(item_id=item.id, position=after + i, text=t)
                    for i, t in enumerate(new_captions)
                ]
                tag_after = max((t.position for t in item.tag_rows), default=-1) + 1
                session.add_all(added)
                session.add_all(
                    ItemTag(item_id=item.id, position=tag_after + i, tag=t)
                    for i, t in enumerate(new_tags)
                )
                if new_keys:
                    # A new dict: the JSON column sees an assignment, not an in-place change.
                    item.attributes = {**item.attributes, **{k: attributes[k] for k in new_keys}}
                session.flush()
                session.refresh(item, ["captions", "tag_rows"])
                if new_captions or new_tags:
                    item.search_text = _search_text([c.text for c in item.captions], item.tags)
                item.updated_at = now
                session.flush()
                added_captions = [CaptionOut(id=c.id, text=c.text) for c in added]
            else:
                added_captions = []
            merged = ItemMerged(
                item=_item_view(item),
                added_captions=added_captions,
                added_tags=new_tags,
                added_attributes=new_keys,
                conflicts=conflicts,
            )
        return merged

    @staticmethod
    def _locked_item(session: Session, item_id: int) -> Item:
        """The item, locked for the rest of the transaction. A write first: it takes SQLite's
        write lock up front (a read first could not become a write once another writer
        committed) and PostgreSQL's row lock, so two changes to one item run one after the
        other."""
        locked = session.execute(
            update(Item)
            .where(Item.id == item_id)
            .values(updated_at=Item.updated_at)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        item = session.get(Item, item_id) if locked else None
        if item is None:
            raise item_not_found(item_id)
        return item

    def delete_captions(self, item_id: int, caption_ids: list[int]) -> ItemOut:
        """Remove these captions from the item (ids of other items' captions, or of none, are
        left alone): how the gateway takes back the captions of a merge whose vectors it could
        not store. Their vectors are the retrieval service's to drop."""
        if not _is_int64(item_id):
            raise item_not_found(item_id)
        wanted = [i for i in caption_ids if _is_int64(i)]
        with self._session.begin() as session:
            item = self._locked_item(session, item_id)
            if wanted:
                removed = session.execute(
                    delete(Caption)
                    .where(Caption.item_id == item_id, Caption.id.in_(wanted))
                    .execution_options(synchronize_session=False)
                ).rowcount  # type: ignore[attr-defined]
                if removed:
                    session.expire(item, ["captions"])
                    item.search_text = _search_text([c.text for c in item.captions], item.tags)
                    item.updated_at = utcnow()
                    session.flush()
            return _item_view(item)

    def _insert_collection(self, name: str, now: datetime) -> Any:
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        # ON CONFLICT DO NOTHING: two first uploads to a new collection must not race to a 500.
        return (
            insert(Collection)
            .values(name=name, created_at=now, updated_at=now, index_settings={})
            .on_conflict_do_nothing(index_elements=["name"])
        )

    def get_item(self, item_id: int) -> ItemOut:
        if not _is_int64(item_id):
            raise item_not_found(item_id)
        with self._session() as session:
            item = session.get(Item, item_id)
            if item is None or not self._visible(session, item.collection):
                raise item_not_found(item_id)
            return _item_view(item)

    @staticmethod
    def _visible(session: Session, collection: str) -> bool:
        """False for a collection being deleted: its items are gone from answers already."""
        return session.execute(_VISIBLE_COLLECTION, {"collection": collection}).first() is not None

    def image(self, item_id: int, *, thumbnail: bool = False) -> StoredImage:
        """The stored original, or its thumbnail (made now if the item predates thumbnails or
        the configured size changed)."""
        if not _is_int64(item_id):
            raise item_not_found(item_id)
        with self._session() as session:
            row = session.execute(
                select(Item.image_sha256, Item.content_type, Item.collection).where(
                    Item.id == item_id
                )
            ).first()
            if row is not None and not self._visible(session, row.collection):
                row = None
        if row is None:
            raise item_not_found(item_id)
        sha256 = row.image_sha256
        path = self.images.path(sha256)
        if not thumbnail:
            if not path.is_file():
                # The row says the file exists: its absence is data loss, not a caller error.
                raise ProblemError(f"the image of item {item_id} is missing", code="image_missing")
            return StoredImage(path, f'"{sha256}"', row.content_type)
        size = self.settings.thumbnail_size
        thumb = self.images.thumbnail_path(sha256, size)
        if not thumb.is_file():
            with self.images.lock(sha256):
                if not path.is_file():
                    raise ProblemError(
                        f"the image of item {item_id} is missing", code="image_missing"
                    )
                self.images.put_thumbnail(sha256, size, make_thumbnail(path.read_bytes(), size))
        return StoredImage(thumb, f'"{sha256}-{size}"', THUMBNAIL_CONTENT_TYPE)

    def set_status(
        self,
        item_id: int,
        status: str,
        *,
        model_id: str | None = None,
        error: str | None = None,
    ) -> ItemOut:
        """Move an item to ``status``. ``indexed`` records the vectors' model (and gives it to the
        collection if it has none yet; another model is 409 ``model_mismatch``) and clears the
        last error; ``failed`` records ``error`` and counts the attempt."""
        if not _is_int64(item_id):
            raise item_not_found(item_id)
        now = utcnow()
        with self._session.begin() as session:
            item = session.get(Item, item_id, with_for_update=self.dialect == "postgresql")
            if item is None:
                raise item_not_found(item_id)
            if status == "indexed":
                if model_id is not None:
                    self._claim_model(session, item.collection, model_id)
                    item.model_id = model_id
                item.indexed_at = now
                item.error = None
            elif status == "failed":
                item.error = (error or "unknown error")[:4000]
                item.attempts = (item.attempts or 0) + 1
                item.indexed_at = None
            else:
                item.indexed_at = None
            item.status = status
            item.updated_at = now
            session.flush()
            view = _item_view(item)
        self.refresh_gauge(view.collection)
        return view

    def _claim_model(self, session: Session, collection: str, model_id: str) -> None:
        row = session.get(Collection, collection, with_for_update=self.dialect == "postgresql")
        if row is None:  # the item's foreign key makes this impossible
            raise collection_not_found(collection)
        if row.model_id is None:
            row.model_id = model_id
            row.updated_at = utcnow()
        elif row.model_id != model_id:
            raise Conflict(
                f"collection {collection!r} holds vectors of model {row.model_id!r}, "
                f"not {model_id!r}",
                code="model_mismatch",
            )

    def delete_item(self, item_id: int) -> None:
        """Delete the item (its captions and tags go by ON DELETE CASCADE), then its image file
        and thumbnails if no other item uses the same bytes."""
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
        self._remove_unused_images([sha256])
        self.refresh_gauge(collection)

    def _remove_unused_images(self, hashes: list[str]) -> None:
        for sha256 in hashes:
            with self.images.lock(sha256), self._session() as session:
                in_use = session.scalar(select(Item.id).where(Item.image_sha256 == sha256).limit(1))
                if in_use is None:
                    self.images.remove(sha256)

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

    def hits_json(self, collection: str, target: str, ids: list[int]) -> bytes:
        """The JSON of ``HitsOut``: search hits of ``collection`` with their items (and
        captions, for target=text), in the order of ``ids``, each once: what a page of results
        shows, in one call. Items that are not indexed, or of another collection, are left out.

        On every uncached search, so built from plain rows (no ORM objects, no models) and
        serialised by pydantic-core, which writes the same JSON as the models would."""
        wanted = list(dict.fromkeys(i for i in ids if _is_int64(i)))
        if not wanted:
            return _NO_HITS
        with self.engine.connect() as connection:
            caption_of: dict[int, tuple[int, str]] = {}
            if target == "text":
                for caption_id, item_id, caption_text in connection.execute(
                    _CAPTIONS_BY_ID, {"ids": wanted}
                ):
                    caption_of[caption_id] = (item_id, caption_text)
                item_ids = list(dict.fromkeys(caption_of[i][0] for i in wanted if i in caption_of))
            else:
                item_ids = wanted
            items = self._item_views(connection, collection, item_ids) if item_ids else {}
            if (
                not items
                and connection.execute(_VISIBLE_COLLECTION, {"collection": collection}).first()
                is None
            ):
                raise collection_not_found(collection)  # none, or one being deleted
        hits: list[dict[str, Any]]
        if target == "text":
            hits = [
                {"id": i, "caption": {"id": i, "text": caption_of[i][1]}, "item": item}
                for i in wanted
                if i in caption_of and (item := items.get(caption_of[i][0])) is not None
            ]
        else:
            hits = [
                {"id": i, "caption": None, "item": item}
                for i in wanted
                if (item := items.get(i)) is not None
            ]
        return to_json({"hits": hits})

    @staticmethod
    def _item_views(
        connection: Connection, collection: str, item_ids: list[int]
    ) -> dict[int, dict[str, Any]]:
        """Indexed items of ``collection`` among ``item_ids`` as ``ItemOut`` dicts (same keys,
        same order), with their captions and tags: three indexed queries, whatever the count."""
        rows = connection.execute(_INDEXED_ITEMS, {"ids": item_ids, "collection": collection}).all()
        if not rows:
            return {}
        found = [row[0] for row in rows]
        captions: dict[int, list[dict[str, Any]]] = {i: [] for i in found}
        for item_id, caption_id, caption_text in connection.execute(_ITEM_CAPTIONS, {"ids": found}):
            captions[item_id].append({"id": caption_id, "text": caption_text})
        tags: dict[int, list[str]] = {i: [] for i in found}
        for item_id, tag in connection.execute(_ITEM_TAGS, {"ids": found}):
            tags[item_id].append(tag)
        return {
            row[0]: {
                "id": row[0],
                "collection": row[1],
                "captions": captions[row[0]],
                "attributes": row[2],
                "tags": tags[row[0]],
                "status": row[3],
                "image_sha256": row[4],
                "content_type": row[5],
                "source_uri": row[6],
                "model_id": row[7],
                "error": row[8],
                "attempts": row[9],
                "created_at": _utc(row[10]),
                "updated_at": _utc(row[11]),
                "indexed_at": _utc_or_none(row[12]),
            }
            for row in rows
        }

    # --- filters and keyword search ---------------------------------------------------------

    def _require_collection(self, session: Session, name: str) -> Collection:
        row = session.get(Collection, name) if is_collection_name(name) else None
        if row is None or row.deletion_id is not None:  # one being deleted is gone already
            raise collection_not_found(name)
        return row

    def _searchable(self, collection: str, raw_filters: Any) -> list[Any]:
        """The conditions every search answer meets: the collection, indexed, the filter."""
        condition = compile_filter(parse_filter(raw_filters), self.dialect)
        conditions: list[Any] = [Item.collection == collection, Item.status == "indexed"]
        if condition is not None:
            conditions.append(condition)
        return conditions

    def filter_items(
        self, collection: str, raw_filters: Any, target: str | None = None
    ) -> FilterOut:
        """Indexed items of ``collection`` (and their captions) that match the filter: the
        allow-list a vector search runs against; only one of the lists for a ``target``."""
        conditions = self._searchable(collection, raw_filters)
        item_ids: list[int] | None = None
        caption_ids: list[int] | None = None
        with self._session() as session:
            self._require_collection(session, collection)
            if target != "text":
                item_ids = list(
                    session.scalars(select(Item.id).where(*conditions).order_by(Item.id))
                )
            if target != "image":
                caption_ids = list(
                    session.scalars(
                        select(Caption.id)
                        .join(Item, Caption.item_id == Item.id)
                        .where(*conditions)
                        .order_by(Caption.id)
                    )
                )
        return FilterOut(item_ids=item_ids, caption_ids=caption_ids)

    def keyword_search(
        self, collection: str, query: str, *, top_k: int, target: str, raw_filters: Any = None
    ) -> list[KeywordHit]:
        """Indexed items (target=image) or their captions (target=text) ranked by how well their
        words match ``query``; see ``fulltext``."""
        terms = query_terms(query)
        conditions = self._searchable(collection, raw_filters)
        with self._session() as session:
            self._require_collection(session, collection)
            rows = session.execute(
                keyword_select(self.dialect, target, terms, conditions).limit(top_k)
            ).all()
        return [KeywordHit(id=r.id, item_id=r.item_id, score=float(r.score)) for r in rows]

    # --- collections ----------------------------------------------------------------------

    def create_collection(self, body: CollectionCreate) -> CollectionOut:
        now = utcnow()
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        with self._session.begin() as session:
            created = session.execute(
                insert(Collection)
                .values(
                    name=body.name,
                    created_at=now,
                    updated_at=now,
                    model_id=body.model_id,
                    index_settings=body.index.model_dump(),
                    description=body.description,
                )
                .on_conflict_do_nothing(index_elements=["name"])
                .returning(Collection.name)
            ).first()
        if created is None:
            with self._session() as session:
                existing = session.get(Collection, body.name)
                if existing is not None and existing.deletion_id is not None:
                    raise collection_being_deleted(body.name)
            raise Conflict(f"collection {body.name!r} already exists", code="collection_exists")
        self.refresh_gauge(body.name)
        return self.get_collection(body.name)

    def _describe(self, session: Session, rows: list[Collection]) -> list[CollectionOut]:
        names = [row.name for row in rows]
        if not names:
            return []
        counts: dict[str, dict[str, int]] = {name: {} for name in names}
        for name, status, count in session.execute(
            select(Item.collection, Item.status, func.count(Item.id))
            .where(Item.collection.in_(names))
            .group_by(Item.collection, Item.status)
        ):
            counts[name][status] = count
        captions = dict(
            session.execute(
                select(Item.collection, func.count(Caption.id))
                .join(Caption, Caption.item_id == Item.id)
                .where(Item.collection.in_(names), Item.status == "indexed")
                .group_by(Item.collection)
            ).all()
        )
        return [
            CollectionOut(
                name=row.name,
                items=counts[row.name].get("indexed", 0),
                counts=StatusCounts(**counts[row.name]),
                captions=captions.get(row.name, 0),
                model_id=row.model_id,
                index=IndexSettings(**(row.index_settings or {})),
                description=row.description,
                created_at=_utc(row.created_at),
                updated_at=_utc_or_none(row.updated_at),
            )
            for row in rows
        ]

    def get_collection(self, name: str) -> CollectionOut:
        with self._session() as session:
            row = self._require_collection(session, name)
            return self._describe(session, [row])[0]

    def list_collections(self) -> list[CollectionOut]:
        with self._session() as session:
            rows = list(
                session.scalars(
                    select(Collection)
                    .where(Collection.deletion_id.is_(None))
                    .order_by(Collection.name)
                )
            )
            return self._describe(session, rows)

    # --- collection deletion: a job (models.CollectionDeletion) -----------------------------

    def delete_collection(self, name: str) -> CollectionDeletionOut:
        """Start deleting the collection: from now on it is gone from every answer (404), its
        name kept until its rows are. Returns the deletion, or the one already under way."""
        now = utcnow()
        with self._session.begin() as session:
            row = (
                session.get(Collection, name, with_for_update=self.dialect == "postgresql")
                if is_collection_name(name)
                else None
            )
            if row is None:
                raise collection_not_found(name)
            if row.deletion_id is not None:
                job = session.get(CollectionDeletion, row.deletion_id)
                assert job is not None
                return _deletion_view(job)
            items = session.scalar(select(func.count(Item.id)).where(Item.collection == name)) or 0
            job = CollectionDeletion(
                collection=name,
                state="dropping",
                items=items,
                items_left=items,
                started_at=now,
                updated_at=now,
            )
            session.add(job)
            session.flush()
            row.deletion_id = job.id
            view = _deletion_view(job)
        for status in STATUSES:
            with contextlib.suppress(KeyError):  # a label never set on this replica
                ITEMS.remove(name, status)
        log.info("deletion %d of collection %s started (%d items)", view.id, name, items)
        return view

    def deletion(self, deletion_id: int) -> CollectionDeletionOut:
        with self._session() as session:
            job = session.get(CollectionDeletion, deletion_id) if _is_int64(deletion_id) else None
            if job is None:
                raise NotFound(f"no deletion {deletion_id}", code="deletion_not_found")
            return _deletion_view(job)

    def deletions(self, state: str) -> list[CollectionDeletionOut]:
        with self._session() as session:
            jobs = session.scalars(
                select(CollectionDeletion)
                .where(CollectionDeletion.state == state)
                .order_by(CollectionDeletion.id)
            )
            return [_deletion_view(job) for job in jobs]

    def vectors_dropped(self, deletion_id: int) -> CollectionDeletionOut:
        """The retrieval service dropped the collection's vectors: its rows may go now."""
        with self._session.begin() as session:
            job = session.get(
                CollectionDeletion, deletion_id, with_for_update=self.dialect == "postgresql"
            )
            if job is None:
                raise NotFound(f"no deletion {deletion_id}", code="deletion_not_found")
            if job.state == "dropping":
                job.state = "purging"
                job.updated_at = utcnow()
            return _deletion_view(job)

    def purge_step(self, deletion_id: int, batch: int) -> bool:
        """Remove one batch of a purging deletion's items (their captions and tags go by ON
        DELETE CASCADE) and the image files nothing else uses; once none is left, the collection
        row, which frees its name. False when the deletion is done (or not purging).

        Files go before rows: a crash in between leaves rows of a hidden collection, which the
        next step removes, never a file that nothing names."""
        with self._session() as session:
            job = session.get(CollectionDeletion, deletion_id)
            if job is None or job.state != "purging":
                return False
            name = job.collection
            rows = session.execute(
                select(Item.id, Item.image_sha256)
                .where(Item.collection == name)
                .order_by(Item.id)
                .limit(batch)
            ).all()
        for sha256 in sorted({sha for _, sha in rows}):
            with self.images.lock(sha256), self._session() as session:
                elsewhere = session.scalar(
                    select(Item.id)
                    .where(Item.image_sha256 == sha256, Item.collection != name)
                    .limit(1)
                )
                if elsewhere is None:
                    self.images.remove(sha256)
        now = utcnow()
        with self._session.begin() as session:
            job = session.get(
                CollectionDeletion, deletion_id, with_for_update=self.dialect == "postgresql"
            )
            if job is None or job.state != "purging":
                return False
            if rows:
                deleted = session.execute(
                    delete(Item)
                    .where(Item.id.in_([item_id for item_id, _ in rows]))
                    .execution_options(synchronize_session=False)
                ).rowcount  # type: ignore[attr-defined]
                # Counted down, not counted again: a count per batch would read the whole
                # remainder every time. Nothing is added to a collection being deleted.
                job.items_left = max(0, job.items_left - deleted)
                job.updated_at = now
                return True
            session.execute(
                delete(Collection).where(
                    Collection.name == name, Collection.deletion_id == deletion_id
                )
            )
            job.state, job.items_left, job.updated_at, job.finished_at = "done", 0, now, now
        log.info("deletion %d of collection %s done", deletion_id, name)
        return False

    # --- ingestion state: what reconcile and resuming clients ask --------------------------

    def item_states(
        self,
        collection: str,
        *,
        status: str | None = None,
        after: int | None = None,
        limit: int = 1000,
        updated_before: datetime | None = None,
    ) -> ItemStatesOut:
        """One page of the collection's items (id order) with their status and caption ids."""
        with self._session() as session:
            self._require_collection(session, collection)
            query = select(Item).where(Item.collection == collection)
            if status is not None:
                query = query.where(Item.status == status)
            if after is not None:
                query = query.where(Item.id > after)
            if updated_before is not None:
                query = query.where(Item.updated_at < _utc(updated_before))
            items = list(session.scalars(query.order_by(Item.id).limit(limit + 1)))
            page = items[:limit]
            states = [
                ItemState(
                    id=item.id,
                    status=item.status,  # type: ignore[arg-type]
                    image_sha256=item.image_sha256,
                    caption_ids=[c.id for c in item.captions],
                    model_id=item.model_id,
                    error=item.error,
                    attempts=item.attempts,
                    updated_at=_utc(item.updated_at),
                )
                for item in page
            ]
        next_after = page[-1].id if len(items) > limit else None
        return ItemStatesOut(items=states, next_after=next_after)

    def find_hashes(self, collection: str, hashes: list[str]) -> list[HashMatch]:
        """Which of these image hashes the collection holds, and in which state: lets a client
        skip uploads that would be duplicates."""
        wanted = list(dict.fromkeys(hashes))
        with self._session() as session:
            self._require_collection(session, collection)
            rows = session.execute(
                select(Item.image_sha256, Item.id, Item.status)
                .where(Item.collection == collection, Item.image_sha256.in_(wanted))
                .order_by(Item.id)
            ).all()
        found: dict[str, HashMatch] = {}
        for sha256, item_id, status in rows:
            found.setdefault(sha256, HashMatch(sha256=sha256, id=item_id, status=status))
        return [found[h] for h in wanted if h in found]

    # --- metrics ----------------------------------------------------------------------------

    def refresh_gauge(self, collection: str | None = None) -> None:
        """Set ``metadata_items`` from the database for one collection, or all of them."""
        try:
            with self._session() as session:
                names_query = select(Collection.name).where(Collection.deletion_id.is_(None))
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
