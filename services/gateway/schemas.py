"""Public request and response bodies of the gateway."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from shared.bounded_json import JsonBoundsError, json_problem, loads_bounded
from shared.collections import COLLECTION_NAME_PATTERN
from shared.contracts.filters import TAG_PATTERN, component_schema
from shared.contracts.metadata import (
    SOURCE_URI_PATTERN,
    AttributeConflict,
    CaptionOut,
    ItemMerge,
    ItemOut,
)
from shared.problems import Unprocessable

MAX_QUERY_CHARS = 1000
# JSON in form fields: a filter (a JSON body is bounded by GATEWAY_MAX_JSON_BYTES, 64 KiB by
# default) and an item's attributes (the metadata service's MAX_ATTRIBUTES_JSON_CHARS).
MAX_FILTER_JSON_CHARS = 64 * 1024
MAX_ATTRIBUTES_JSON_CHARS = 512 * 1024
# The metadata service's defaults (METADATA_MAX_CAPTION_CHARS, METADATA_MAX_CAPTIONS, MAX_TAGS,
# MAX_SOURCE_URI_CHARS): it checks captions, tags and the source URI itself, after removing
# surrounding white space.
MAX_CAPTION_CHARS = 1000
MAX_CAPTIONS = 32
MAX_TAGS = 64
MAX_SOURCE_URI_CHARS = 2048
# An uploaded image's schema: an empty file is refused (invalid_image).
NOT_EMPTY = {"minLength": 1}


def not_null(schema: dict[str, Any]) -> None:
    """A ``json_schema_extra`` for an optional form field: absent is how a form leaves it out;
    it cannot send null (the text "null" is a value like any other)."""
    kept = [s for s in schema.pop("anyOf") if s.get("type") != "null"]
    if len(kept) == 1:
        schema.update(kept[0])
    else:
        schema["anyOf"] = kept


def one_or_many(schema: dict[str, Any]) -> None:
    """A ``json_schema_extra`` for a repeatable form field (``list[X] | None``): on the wire a
    field sent once is a list of one, so the document says "X, or a list of X" (and not null,
    which a form cannot send)."""
    many = next(s for s in schema.pop("anyOf") if s.get("type") == "array")
    schema["anyOf"] = [many, many["items"]]


Target = Literal["image", "text"]
SearchMode = Literal["vector", "keyword", "hybrid"]
# The filter language is the metadata service's (docs/metadata.md): it validates, with a pointer
# to the bad part; the gateway only checks that filters are a JSON object. The document describes
# the language (shared/contracts/filters.py).
Filters = dict[str, Any]


def _integer(value: Any) -> Any:
    # JSON Schema's integer: 10 and 10.0, never "10" or true (which pydantic's lax int takes).
    if isinstance(value, str | bool):
        raise ValueError("must be an integer")
    return value


JsonInt = Annotated[int, BeforeValidator(_integer)]


class SearchOptions(BaseModel):
    """Fields shared by text and image search."""

    model_config = ConfigDict(extra="forbid")

    top_k: JsonInt = Field(10, ge=1, le=100, description="Number of results, 1 to 100.")
    target: Target = Field("image", description="What to return: images or captions.")
    collection: str = Field("demo", pattern=COLLECTION_NAME_PATTERN)
    filters: Filters | None = Field(
        None,
        description="Filter language of docs/metadata.md: {attribute: value}, "
        "{attribute: [values]}, ranges, tags, and/or/not.",
        examples=[{"colour": "red"}, {"colour": ["red", "blue"], "shape": "circle"}],
        json_schema_extra=component_schema("Filter", nullable=True),
    )

    @field_validator("filters")
    @classmethod
    def _bounded(cls, value: Filters | None) -> Filters | None:
        # Checked before any work: JSON deeper than a filter can be would only be refused later
        # by the metadata service, and past ~250 levels, or with an unpaired surrogate, it could
        # not even be sent there (a 500).
        problem = None if value is None else json_problem(value)
        if problem:
            raise Unprocessable(f"filters {problem}", code="invalid_filter")
        return value


def _binary_part(schema: dict[str, Any]) -> None:
    # A file part, described as FastAPI describes an UploadFile; an empty one is refused.
    kept = {k: v for k, v in schema.items() if k in ("title", "description")}
    schema.clear()
    schema.update({"type": "string", "contentMediaType": "application/octet-stream"})
    schema.update(NOT_EMPTY | kept)


class ImageSearchFields(BaseModel):
    """The fields of ``POST /search/image``'s form besides the image (text on the wire: top_k
    is read from its digits)."""

    top_k: int = Field(10, ge=1, le=100)
    target: Target = "text"
    collection: str = Field("demo", pattern=COLLECTION_NAME_PATTERN)
    filters: str | None = Field(None, description="A filter (JSON object), as in /search/text")


class _ImageSearchForm(ImageSearchFields):
    image: bytes = Field(description="The query image.", json_schema_extra=_binary_part)


def image_search_form_schema() -> dict[str, Any]:
    """The ``ImageSearchForm`` component: ``POST /search/image``'s form as the OpenAPI document
    shows it (``uploads.read_image_search_form`` reads it). ``filters`` is text that holds a
    Filter; the reference is set here, outside pydantic, which looks for Filter among its own
    models."""
    schema = _ImageSearchForm.model_json_schema()
    schema["title"] = "ImageSearchForm"
    schema["properties"]["filters"] = filters = {
        k: v for k, v in schema["properties"]["filters"].items() if k != "default"
    }
    component_schema("Filter")(filters)
    return schema


class TextSearchRequest(SearchOptions):
    # Keyword search (alone or in hybrid) needs a word: a letter or a digit (metadata's
    # fulltext.query_terms); it answers invalid_query otherwise.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"mode": {"enum": ["keyword", "hybrid"]}}, "required": ["mode"]},
            "then": {"properties": {"query": {"pattern": r"[^\W_]"}}},
        }
    )

    # Not blank: at least one character that is not white space.
    query: str = Field(..., min_length=1, max_length=MAX_QUERY_CHARS, pattern=r"\S")
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


# Form fields of POST /items as the document describes them.
# Not blank, and no NUL (the metadata service refuses it: PostgreSQL cannot store it).
CaptionText = Annotated[
    str, StringConstraints(max_length=MAX_CAPTION_CHARS, pattern=r"^[^\x00]*[^\s\x00][^\x00]*$")
]
Tag = Annotated[str, StringConstraints(pattern=TAG_PATTERN)]
SourceUri = Annotated[
    str, StringConstraints(max_length=MAX_SOURCE_URI_CHARS, pattern=SOURCE_URI_PATTERN)
]


class PublicItem(ItemOut):
    image_url: str = Field(description="Where GET answers the item's image")


class MergeRequest(BaseModel):
    """The body of ``POST /items/{item_id}/merge``: what a duplicate of the item brings."""

    model_config = ConfigDict(extra="forbid")

    captions: list[CaptionText] = Field(
        default_factory=list,
        max_length=MAX_CAPTIONS,
        description="Captions to add; those the item has (same text once whitespace is "
        "collapsed) are left out.",
    )
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS, description="Tags to add.")
    attributes: dict[str, Any] = Field(
        default_factory=dict,
        description="Attributes to add: keys the item has keep the item's value.",
        json_schema_extra=component_schema("Attributes"),
    )

    @field_validator("captions")
    @classmethod
    def _captions_are_text(cls, value: list[str]) -> list[str]:
        problem = json_problem(value)
        if problem:
            raise Unprocessable(f"captions {problem}", code="invalid_caption")
        return value

    @field_validator("attributes")
    @classmethod
    def _flat(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Checked here only as far as forwarding needs (flat, and text that is text); the
        # metadata service checks the keys and values.
        nested = next((k for k, v in value.items() if isinstance(v, dict | list)), None)
        if nested is not None:
            raise Unprocessable(
                f"attribute {nested[:80]!r}: values must be a string, number, boolean or null",
                code="invalid_attributes",
            )
        problem = json_problem(value)
        if problem:
            raise Unprocessable(f"attributes {problem}", code="invalid_attributes")
        return value

    def contract(self) -> ItemMerge:
        return ItemMerge(captions=self.captions, tags=self.tags, attributes=self.attributes)


class MergedItem(BaseModel):
    item: PublicItem
    added_captions: list[CaptionOut] = Field(
        description="The captions added, in the order given, each embedded and searchable."
    )
    added_tags: list[str]
    added_attributes: list[str] = Field(description="The attribute keys added.")
    conflicts: list[AttributeConflict] = Field(
        description="Attributes the item has with another value: its own value is kept."
    )


class Caption(BaseModel):
    id: int
    text: str


class SearchHit(BaseModel):
    rank: int
    score: float
    item_id: int
    caption: Caption | None = Field(None, description="The matching caption when target=text.")
    item: PublicItem


class SearchResponse(BaseModel):
    collection: str
    target: Target
    top_k: int
    model_id: str | None = Field(
        description="The model of the query vector; null for keyword mode."
    )
    results: list[SearchHit]


def parse_filters_form(raw: str | None) -> Filters | None:
    """Filters arrive as a JSON string in multipart forms: parsed once within bounds."""
    if raw is None or not raw.strip():
        return None
    try:
        value = loads_bounded(raw, what="filters", max_chars=MAX_FILTER_JSON_CHARS)
    except JsonBoundsError as exc:
        raise Unprocessable(str(exc), code="invalid_filter") from None
    if not isinstance(value, dict):
        raise Unprocessable("filters must be a JSON object", code="invalid_filter")
    return value


def check_attributes_form(raw: str | None) -> str | None:
    """The ``attributes`` form field of ``POST /items``, refused before the image is embedded if
    it is not a JSON object within bounds; the metadata service checks its members."""
    if raw is None or not raw.strip():
        return raw
    try:
        value = loads_bounded(raw, what="attributes", max_chars=MAX_ATTRIBUTES_JSON_CHARS)
    except JsonBoundsError as exc:
        raise Unprocessable(str(exc), code="invalid_attributes") from None
    if not isinstance(value, dict):
        raise Unprocessable("attributes must be a JSON object", code="invalid_attributes")
    return raw
