"""Checks of client input: collection names, captions, tags, attributes and source URIs. Each
failure is a 422 problem with its own ``code`` so callers can tell what to fix. (The filter
language has its own module, ``filters``.)"""

from __future__ import annotations

import math
import re
from typing import Any, Final

from shared.bounded_json import JsonBoundsError, loads_bounded
from shared.collections import COLLECTION_NAME_PATTERN, is_collection_name
from shared.contracts.metadata import SOURCE_URI_PATTERN, SOURCE_URI_SCHEMES
from shared.problems import Unprocessable

# Keys end up inside a JSON path on SQLite ($."key"); a quote or backslash there would change
# the path's meaning, so keys are limited to a safe, ordinary alphabet.
ATTRIBUTE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$")
MAX_ATTRIBUTES: Final = 64
MAX_ATTRIBUTE_CHARS: Final = 1000
# The attributes form field as JSON text: room for 64 attributes of 1000 characters each even
# when every character is written as a \u00e9 escape.
MAX_ATTRIBUTES_JSON_CHARS: Final = 512 * 1024
MAX_FILTER_VALUES: Final = 1000
MAX_TAGS: Final = 64
# A tag is one word or short phrase: letters, digits and a few separators, no control characters
# and no surrounding spaces.
TAG = re.compile(r"^[\w][\w .:/+&'#-]{0,62}[\w]$|^[\w]$")
MAX_SOURCE_URI_CHARS: Final = 2048
_SOURCE_URI = re.compile(SOURCE_URI_PATTERN)
# Characters no text column takes: PostgreSQL refuses NUL in text and JSONB, and an unpaired
# surrogate (valid in JSON as "\ud800") cannot be encoded as UTF-8 for either database.
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")
NOT_TEXT_PROBLEM: Final = "strings cannot hold NUL (\\u0000) or an unpaired surrogate"
# SQLite stores JSON integers as signed 64-bit; larger ones would silently become floats.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

Scalar = str | int | float | bool | None


def check_collection_name(name: str) -> str:
    if not is_collection_name(name):
        raise Unprocessable(
            f"collection names match {COLLECTION_NAME_PATTERN}", code="invalid_collection"
        )
    return name


def check_captions(captions: list[str], *, max_captions: int, max_chars: int) -> list[str]:
    """Captions with surrounding whitespace removed; blank or too-long ones are refused."""
    if len(captions) > max_captions:
        raise Unprocessable(
            f"an item has at most {max_captions} captions, got {len(captions)}",
            code="too_many_captions",
        )
    cleaned = []
    for index, caption in enumerate(captions):
        text = caption.strip()
        if not text:
            raise Unprocessable(f"caption {index} is blank", code="invalid_caption")
        if _NOT_TEXT.search(text):
            raise Unprocessable(f"caption {index}: {NOT_TEXT_PROBLEM}", code="invalid_caption")
        if len(text) > max_chars:
            raise Unprocessable(
                f"caption {index} is longer than {max_chars} characters", code="invalid_caption"
            )
        cleaned.append(text)
    return cleaned


def check_tags(tags: list[str]) -> list[str]:
    """Tags with surrounding whitespace removed and repeats dropped (first one kept)."""
    cleaned: list[str] = []
    for index, tag in enumerate(tags):
        text = tag.strip()
        if not TAG.fullmatch(text):
            raise Unprocessable(
                f"tag {index} ({text[:80]!r}) must be 1-64 letters, digits, spaces or . : / + & ' # -"
                ", starting and ending with a letter or digit",
                code="invalid_tag",
            )
        if text not in cleaned:
            cleaned.append(text)
    if len(cleaned) > MAX_TAGS:
        raise Unprocessable(f"an item has at most {MAX_TAGS} tags", code="invalid_tag")
    return cleaned


def check_source_uri(uri: str | None) -> str | None:
    """Where the image came from: stored as given if it is a link a reader may follow (a scheme
    of ``SOURCE_URI_SCHEMES``, no credentials, printable, bounded)."""
    if uri is None or not uri.strip():
        return None
    uri = uri.strip()
    if len(uri) > MAX_SOURCE_URI_CHARS or not _SOURCE_URI.fullmatch(uri):
        raise Unprocessable(
            f"source_uri must be a URL with scheme {', '.join(SOURCE_URI_SCHEMES)} "
            "(scheme://host/..., no user or password), of at most "
            f"{MAX_SOURCE_URI_CHARS} printable characters",
            code="invalid_source_uri",
        )
    return uri


def scalar_problem(value: Any) -> str | None:
    """Why ``value`` cannot be an attribute value, or None if it can."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if _INT64_MIN <= value <= _INT64_MAX else "integers must fit in 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else "numbers must be finite"
    if isinstance(value, str):
        if len(value) > MAX_ATTRIBUTE_CHARS:
            return f"strings are at most {MAX_ATTRIBUTE_CHARS} characters"
        return NOT_TEXT_PROBLEM if _NOT_TEXT.search(value) else None
    return "values must be a string, number, boolean or null"


def same_value(a: Scalar, b: Scalar) -> bool:
    """Equality as the filter language has it: JSON types count (``1`` is ``1.0``, but neither
    ``"1"`` nor ``true``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def parse_attributes(raw: str | None) -> dict[str, Scalar]:
    """The ``attributes`` form field: a JSON object of flat scalar values (absent means {})."""
    if raw is None or not raw.strip():
        return {}
    try:
        value = loads_bounded(raw, what="attributes", max_chars=MAX_ATTRIBUTES_JSON_CHARS)
    except JsonBoundsError as exc:
        raise Unprocessable(str(exc), code="invalid_attributes") from None
    return check_attributes(value)


def check_attributes(value: Any) -> dict[str, Scalar]:
    """Attributes as an object: at most ``MAX_ATTRIBUTES`` keys of the safe alphabet, each a
    flat scalar value."""
    if not isinstance(value, dict):
        raise Unprocessable("attributes must be a JSON object", code="invalid_attributes")
    if len(value) > MAX_ATTRIBUTES:
        raise Unprocessable(
            f"at most {MAX_ATTRIBUTES} attributes per item", code="invalid_attributes"
        )
    for key, item in value.items():
        if not ATTRIBUTE_KEY.fullmatch(key):
            raise Unprocessable(
                f"attribute key {key[:80]!r} must match {ATTRIBUTE_KEY.pattern}",
                code="invalid_attributes",
            )
        problem = scalar_problem(item)
        if problem:
            raise Unprocessable(f"attribute {key!r}: {problem}", code="invalid_attributes")
    return value
