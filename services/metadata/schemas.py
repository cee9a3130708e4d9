"""Request and response bodies of the metadata API (docs/architecture.md, metadata section)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

ItemStatus = Literal["pending", "indexed", "failed"]
MAX_LOOKUP_IDS = 10_000


class CaptionOut(BaseModel):
    id: int
    text: str


class ItemOut(BaseModel):
    id: int
    collection: str
    captions: list[CaptionOut]
    attributes: dict[str, Any]
    status: ItemStatus
    image_sha256: str
    content_type: str
    created_at: datetime  # always UTC, serialised as ISO 8601 with "Z"
    updated_at: datetime


class ItemsOut(BaseModel):
    items: list[ItemOut]


class CaptionRef(BaseModel):
    id: int
    item_id: int
    text: str


class CaptionsOut(BaseModel):
    captions: list[CaptionRef]


class FilterOut(BaseModel):
    item_ids: list[int]
    caption_ids: list[int]


class CollectionOut(BaseModel):
    name: str
    items: int  # indexed items only: what a search can return


class CollectionsOut(BaseModel):
    collections: list[CollectionOut]


class StatusUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: ItemStatus


class IdsRequest(BaseModel):
    ids: list[StrictInt] = Field(max_length=MAX_LOOKUP_IDS)


class FilterRequest(BaseModel):
    # Checked by hand (validation.parse_filters) so a bad shape answers code "invalid_filter".
    filters: Any = None
