"""The metadata service's API (services/metadata/app.py, docs/metadata.md): its bodies and the
typed client its callers (the gateway, ``crossmodal reconcile``) use."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from shared.collections import COLLECTION_NAME_PATTERN
from shared.contracts.client import JSON_HEADERS, ServiceApi

ItemStatus = Literal["pending", "indexed", "failed"]
Target = Literal["image", "text"]
MAX_LOOKUP_IDS = 10_000
# 900 hashes as JSON (68 bytes each) fit the gateway's default limit of 64 KiB on JSON bodies.
MAX_HASHES = 900
MAX_KEYWORD_TOP_K = 1000
# A Faiss index factory string such as "Flat", "HNSW32" or "IVF256,PQ16x8": letters, digits and
# a few separators, never free text.
INDEX_FACTORY = re.compile(r"^[A-Za-z0-9_,.=x-]{1,128}$")
# Where an item's image came from is a link a reader may follow, so only these schemes: a page
# showing it must never run ``javascript:`` or ``data:`` nor open a ``file:`` path.
SOURCE_URI_SCHEMES = ("http", "https", "s3", "gs")
# The rule as a pattern, valid in JSON Schema (ECMAScript) as in Python: one of the schemes in any
# letter case, "://", a host without user or password, then printable characters only. The host
# holds no white space (nor a C1 control, some of which Python counts as space), so that white
# space around a URI the pattern accepts can be trimmed and leave a URI it accepts.
SOURCE_URI_PATTERN = (
    r"^\s*([Hh][Tt][Tt][Pp][Ss]?|[Ss]3|[Gg][Ss])://[^\s\x00-\x20\x7f-\x9f/?#@]+"
    r"([/?#][^\x00-\x1f\x7f]*)?\s*$"
)


def caption_key(text: str) -> str:
    """What makes two captions of an item the same caption (docs/metadata.md, "Merging a
    duplicate into the item"): their text in Unicode NFC with whitespace runs collapsed and the
    ends trimmed. Case and punctuation count, as they can change an embedding."""
    return " ".join(unicodedata.normalize("NFC", text).split())


class CaptionOut(BaseModel):
    id: int
    text: str


class ItemOut(BaseModel):
    id: int
    collection: str
    captions: list[CaptionOut]
    attributes: dict[str, Any]
    tags: list[str]
    status: ItemStatus
    image_sha256: str
    content_type: str
    source_uri: str | None
    model_id: str | None
    # The reason of the last failure (kept after a successful retry, until the next failure).
    error: str | None
    attempts: int
    created_at: datetime  # always UTC, serialised as ISO 8601 with "Z"
    updated_at: datetime
    indexed_at: datetime | None


class ItemsOut(BaseModel):
    items: list[ItemOut]


class CaptionRef(BaseModel):
    id: int
    item_id: int
    text: str


class CaptionsOut(BaseModel):
    captions: list[CaptionRef]


class FilterOut(BaseModel):
    item_ids: list[int] | None = Field(description="null when only caption ids were asked for")
    caption_ids: list[int] | None = Field(description="null when only item ids were asked for")


class IndexSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    factory: str = Field(
        "Flat",
        pattern=INDEX_FACTORY.pattern,
        description="Faiss index factory string, e.g. Flat or HNSW32: letters, digits and "
        ", . = x - _ only.",
    )


class StatusCounts(BaseModel):
    pending: int = 0
    indexed: int = 0
    failed: int = 0


class CollectionOut(BaseModel):
    name: str
    items: int = Field(description="indexed items only: what a search can return")
    counts: StatusCounts
    captions: int = Field(description="captions of indexed items")
    model_id: str | None
    index: IndexSettings
    description: str | None
    created_at: datetime
    updated_at: datetime | None


class CollectionsOut(BaseModel):
    collections: list[CollectionOut]


class CollectionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=COLLECTION_NAME_PATTERN)
    model_id: str | None = Field(None, min_length=1, max_length=256)
    index: IndexSettings = Field(default_factory=IndexSettings)
    description: str | None = Field(None, max_length=2000)


DeletionState = Literal["dropping", "purging", "done"]


class CollectionDeletion(BaseModel):
    """A collection's deletion, a job: the collection is gone from every answer from its start;
    ``dropping`` waits for its vectors to be dropped (the gateway's step), ``purging`` removes
    its items, captions and images in batches, ``done`` frees the name."""

    id: int
    collection: str
    state: DeletionState
    items: int = Field(description="items of the collection when the deletion started")
    items_left: int = Field(description="items not removed yet")
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class CollectionDeletionsOut(BaseModel):
    deletions: list[CollectionDeletion]


class StatusUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: ItemStatus
    model_id: str | None = Field(
        None, min_length=1, max_length=256, description="with indexed: the vectors' model"
    )
    error: str | None = Field(None, max_length=4000, description="with failed: the reason")


class ItemMerge(BaseModel):
    """What ``POST /items/{id}/merge`` adds to an indexed item (docs/metadata.md, "Duplicates")."""

    model_config = ConfigDict(extra="forbid")

    captions: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    attributes: dict[str, Any] = Field(default_factory=dict)


class AttributeConflict(BaseModel):
    key: str
    kept: Any = Field(description="the item's value, which stays")
    offered: Any = Field(description="the value the merge brought, not taken")


class ItemMerged(BaseModel):
    item: ItemOut
    added_captions: list[CaptionOut] = Field(description="new captions, in the order given")
    added_tags: list[str]
    added_attributes: list[str] = Field(description="keys the item did not have")
    conflicts: list[AttributeConflict] = Field(
        description="keys the item has with another value: its own value is kept"
    )

    @property
    def changed(self) -> bool:
        return bool(self.added_captions or self.added_tags or self.added_attributes)


class IdsRequest(BaseModel):
    ids: list[StrictInt] = Field(max_length=MAX_LOOKUP_IDS)


class FilterRequest(BaseModel):
    # Checked by hand (filters.parse_filter) so a bad shape answers code "invalid_filter".
    filters: Any = None
    target: Target | None = Field(
        None,
        description="image: only item ids; text: only caption ids; absent: both. A search "
        "needs one list, and the other can be as long as the collection.",
    )


class HitsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: Target = Field(description="image: the ids are item ids; text: caption ids")
    ids: list[StrictInt] = Field(max_length=MAX_LOOKUP_IDS)


class Hit(BaseModel):
    id: int = Field(description="the id asked for: an item id, or a caption id (target=text)")
    caption: CaptionOut | None = Field(description="the caption, for target=text")
    item: ItemOut


class HitsOut(BaseModel):
    hits: list[Hit] = Field(
        description="in the order asked, each id once; ids of missing items, of items not "
        "indexed or of another collection are left out"
    )


class KeywordSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=1000)
    top_k: int = Field(10, ge=1, le=MAX_KEYWORD_TOP_K)
    target: Target = "image"
    filters: Any = None


class KeywordHit(BaseModel):
    id: int = Field(description="the item id (target=image) or caption id (target=text)")
    item_id: int
    score: float = Field(description="higher is better; comparable within one answer only")


class KeywordSearchOut(BaseModel):
    target: Target
    results: list[KeywordHit]


class ItemState(BaseModel):
    id: int
    status: ItemStatus
    image_sha256: str
    caption_ids: list[int]
    model_id: str | None
    error: str | None
    attempts: int
    updated_at: datetime


class ItemStatesOut(BaseModel):
    items: list[ItemState]
    next_after: int | None = Field(description="pass as `after` for the next page; null at the end")


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class HashesRequest(BaseModel):
    sha256: list[Sha256] = Field(max_length=MAX_HASHES)


class HashMatch(BaseModel):
    sha256: str
    id: int
    status: ItemStatus


class HashesOut(BaseModel):
    items: list[HashMatch]


# An uploaded image: (file name, bytes, content type).
ImageFile = tuple[str, bytes, str]


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    content_type: str
    etag: str | None


class ItemForm(BaseModel):
    """The form fields of ``POST /items`` besides the image."""

    collection: str
    captions: list[str] = Field(default_factory=list)
    attributes: str | None = Field(None, description="JSON object, checked by the service")
    tags: list[str] = Field(default_factory=list)
    source_uri: str | None = Field(
        None,
        description="Where the image came from: a URL with scheme "
        f"{', '.join(SOURCE_URI_SCHEMES)}; checked by the service (SOURCE_URI_PATTERN)",
    )


class MetadataClient(ServiceApi):
    """The metadata service as its callers see it: every call returns a parsed answer or raises
    the service's problem (``ProblemError``)."""

    async def hits(self, collection: str, request: HitsRequest) -> HitsOut:
        # A read: safe to repeat.
        raw = await self.post_json(f"/collections/{collection}/hits", request, retry=True)
        return HitsOut.model_validate_json(raw)

    async def filter(self, collection: str, request: FilterRequest) -> FilterOut:
        raw = await self.post_json(f"/collections/{collection}/filter", request, retry=True)
        return FilterOut.model_validate_json(raw)

    async def keyword_search(
        self, collection: str, request: KeywordSearchRequest
    ) -> KeywordSearchOut:
        raw = await self.post_json(f"/collections/{collection}/keyword-search", request, retry=True)
        return KeywordSearchOut.model_validate_json(raw)

    async def create_item(self, form: ItemForm, image: ImageFile) -> ItemOut:
        data: dict[str, str | list[str]] = {
            "collection": form.collection,
            "caption": form.captions,
            "tag": form.tags,
        }
        if form.attributes is not None:
            data["attributes"] = form.attributes
        if form.source_uri is not None:
            data["source_uri"] = form.source_uri
        # Never retried: a lost answer followed by a retry would store the item twice.
        response = await self.http.request(
            "POST", "/items", data=data, files={"image": image}, retry=False
        )
        return ItemOut.model_validate_json(response.content)

    async def item(self, item_id: int) -> ItemOut:
        response = await self.http.request("GET", f"/items/{item_id}")
        return ItemOut.model_validate_json(response.content)

    async def image(
        self, item_id: int, *, size: Literal["original", "thumb"] = "original"
    ) -> StoredImage:
        response = await self.http.request("GET", f"/items/{item_id}/image", params={"size": size})
        return StoredImage(
            data=response.content,
            content_type=response.headers.get("content-type", "application/octet-stream"),
            etag=response.headers.get("etag"),
        )

    async def set_status(self, item_id: int, update: StatusUpdate) -> ItemOut:
        # Setting the same status twice leaves the same state: safe to repeat.
        response = await self.http.request(
            "PATCH",
            f"/items/{item_id}",
            content=update.model_dump_json(exclude_none=True),
            headers=JSON_HEADERS,
            retry=True,
        )
        return ItemOut.model_validate_json(response.content)

    async def delete_item(self, item_id: int) -> None:
        await self.http.request("DELETE", f"/items/{item_id}")

    async def merge_item(self, item_id: int, merge: ItemMerge) -> ItemMerged:
        # Never retried: a repeat of a merge whose answer was lost would answer "nothing added",
        # and the captions the first one added would never get their vectors.
        raw = await self.post_json(f"/items/{item_id}/merge", merge, retry=False)
        return ItemMerged.model_validate_json(raw)

    async def delete_captions(self, item_id: int, ids: list[int]) -> ItemOut:
        raw = await self.post_json(
            f"/items/{item_id}/captions/delete", IdsRequest(ids=ids), retry=True
        )
        return ItemOut.model_validate_json(raw)

    async def item_states(
        self, collection: str, *, after: int | None = None, limit: int = 1000
    ) -> ItemStatesOut:
        params: dict[str, int] = {"limit": limit}
        if after is not None:
            params["after"] = after
        response = await self.http.request("GET", f"/collections/{collection}/items", params=params)
        return ItemStatesOut.model_validate_json(response.content)

    async def collection(self, collection: str) -> CollectionOut:
        response = await self.http.request("GET", f"/collections/{collection}")
        return CollectionOut.model_validate_json(response.content)

    async def collections(self) -> CollectionsOut:
        response = await self.http.request("GET", "/collections")
        return CollectionsOut.model_validate_json(response.content)

    async def create_collection(self, request: CollectionCreate) -> CollectionOut:
        raw = await self.post_json("/collections", request, retry=False)
        return CollectionOut.model_validate_json(raw)

    async def find_hashes(self, collection: str, request: HashesRequest) -> HashesOut:
        raw = await self.post_json(f"/collections/{collection}/hashes", request, retry=True)
        return HashesOut.model_validate_json(raw)

    async def delete_collection(self, collection: str) -> CollectionDeletion:
        """Start the collection's deletion, or return the one under way (safe to repeat)."""
        response = await self.http.request("DELETE", f"/collections/{collection}", retry=True)
        return CollectionDeletion.model_validate_json(response.content)

    async def deletion(self, deletion_id: int) -> CollectionDeletion:
        response = await self.http.request("GET", f"/deletions/{deletion_id}")
        return CollectionDeletion.model_validate_json(response.content)

    async def deletions(self, state: DeletionState) -> CollectionDeletionsOut:
        response = await self.http.request("GET", "/deletions", params={"state": state})
        return CollectionDeletionsOut.model_validate_json(response.content)

    async def vectors_dropped(self, deletion_id: int) -> CollectionDeletion:
        """The deletion's vectors are gone: its rows may go (safe to repeat)."""
        response = await self.http.request(
            "POST", f"/deletions/{deletion_id}/vectors-dropped", retry=True
        )
        return CollectionDeletion.model_validate_json(response.content)
