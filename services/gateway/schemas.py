"""Public request and response bodies of the gateway."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.collections import COLLECTION_NAME_PATTERN, is_collection_name
from shared.problems import Unprocessable

MAX_QUERY_CHARS = 1000

Target = Literal["image", "text"]
SearchMode = Literal["vector", "keyword", "hybrid"]
# The filter language is the metadata service's (docs/metadata.md): it validates, with a pointer
# to the bad part; the gateway only checks that filters are a JSON object.
Filters = dict[str, Any]


class SearchOptions(BaseModel):
    """Fields shared by text and image search."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(10, ge=1, le=100, description="Number of results, 1 to 100.")
    target: Target = Field("image", description="What to return: images or captions.")
    collection: str = Field("demo", pattern=COLLECTION_NAME_PATTERN)
    filters: Filters | None = Field(
        None,
        description="Filter language of docs/metadata.md: {attribute: value}, "
        "{attribute: [values]}, ranges, tags, and/or/not.",
        examples=[{"colour": "red"}, {"colour": ["red", "blue"], "shape": "circle"}],
    )


class TextSearchRequest(SearchOptions):
    query: str = Field(..., min_length=1, max_length=MAX_QUERY_CHARS)
    mode: SearchMode = Field(
        "vector",
        description="vector (CLIP similarity), keyword (full text over captions and tags), "
        "or hybrid (reciprocal rank fusion of both).",
    )

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
    model_id: str | None = Field(
        description="The model of the query vector; null for keyword mode."
    )
    results: list[SearchHit]


def parse_filters_form(raw: str | None) -> Filters | None:
    """Filters arrive as a JSON string in multipart forms."""
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise Unprocessable("filters must be a JSON object", code="invalid_filter") from None
    if not isinstance(value, dict):
        raise Unprocessable("filters must be a JSON object", code="invalid_filter")
    return value


def check_collection(name: str) -> str:
    if not is_collection_name(name):
        raise Unprocessable(
            "collection names are 1-64 characters of a-z, 0-9, '_' and '-'",
            code="invalid_collection",
        )
    return name
