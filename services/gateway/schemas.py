"""Public request and response bodies of the gateway."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.collections import COLLECTION_NAME_PATTERN, is_collection_name
from shared.problems import Unprocessable

MAX_QUERY_CHARS = 1000

Target = Literal["image", "text"]
FilterValue = str | int | float | bool | None
Filters = dict[str, FilterValue | list[FilterValue]]


class SearchOptions(BaseModel):
    """Fields shared by text and image search."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(10, ge=1, le=100, description="Number of results, 1 to 100.")
    target: Target = Field("image", description="What to return: images or captions.")
    collection: str = Field("demo", pattern=COLLECTION_NAME_PATTERN)
    filters: Filters | None = Field(
        None,
        description="Attribute equality filters: {attribute: value} or {attribute: [values]}.",
        examples=[{"colour": "red"}],
    )


class TextSearchRequest(SearchOptions):
    query: str = Field(..., min_length=1, max_length=MAX_QUERY_CHARS)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        normalised = " ".join(value.split())
        if not normalised:
            raise ValueError("the query is blank")
        return normalised


class Caption(BaseModel):
    id: int
    text: str


class SearchHit(BaseModel):
    rank: int
    score: float
    item_id: int
    caption: Caption | None = Field(None, description="The matching caption when target=text.")
    item: dict[str, Any]


class SearchResponse(BaseModel):
    collection: str
    target: Target
    top_k: int
    model_id: str
    results: list[SearchHit]


def parse_filters_form(raw: str | None) -> Filters | None:
    """Filters arrive as a JSON string in multipart forms."""
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise Unprocessable("filters must be a JSON object", code="invalid_filter") from None
    try:
        return SearchOptions(filters=value).filters
    except ValueError:
        raise Unprocessable(
            "filters must map attribute names to a value or a list of values",
            code="invalid_filter",
        ) from None


def check_collection(name: str) -> str:
    if not is_collection_name(name):
        raise Unprocessable(
            "collection names are 1-64 characters of a-z, 0-9, '_' and '-'",
            code="invalid_collection",
        )
    return name
