"""The filter language and item attributes of the metadata service (services/metadata/filters.py,
docs/metadata.md) as JSON Schema, for the documents of the services that take them from clients.

The metadata service parses and checks both itself (with a pointer to the bad part); these
schemas describe the same rules, so that a client, or a fuzzer, can tell a valid filter from an
invalid one without asking. ``FILTER_SCHEMAS`` are OpenAPI components: they refer to each other as
``#/components/schemas/<name>`` (a filter nests), and ``component_schema`` puts a reference to
one in a pydantic or FastAPI field's schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# The limits of services/metadata (validation.py, filters.py); tests/shared/test_contracts.py
# checks that they agree.
ATTRIBUTE_KEY_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$"
TAG_PATTERN = r"^[\w][\w .:/+&'#-]{0,62}[\w]$|^[\w]$"
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_CHARS = 1000
MAX_FILTER_DEPTH = 8
MAX_FILTER_CONDITIONS = 256
MAX_FILTER_VALUES = 1000
# Numbers are stored as SQLite's signed 64-bit integers or as doubles: every number within the
# integers' range fits.
_NUMBER = {"type": "number", "minimum": -(2**63), "maximum": 2**63 - 1}
_DATE_TIME = {
    "type": "string",
    "format": "date-time",
    "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$",
}
_RANGE_OPS = ("$gt", "$gte", "$lt", "$lte")
_MEMBER_OPS = ("$and", "$or", "$not", "$tags", "$created_at", "$updated_at")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _non_empty_list(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": 1}


FILTER_SCHEMAS: dict[str, dict[str, Any]] = {
    "AttributeValue": {
        "description": f"A string (at most {MAX_ATTRIBUTE_CHARS} characters, no NUL), a number "
        "within the range of 64-bit integers, a boolean or null.",
        # One schema, not anyOf: the numbers' range applies to numbers, the length and pattern
        # to strings. NUL is refused (PostgreSQL cannot store it in text).
        "type": ["string", "number", "boolean", "null"],
        "maxLength": MAX_ATTRIBUTE_CHARS,
        "pattern": "^[^\\x00]*$",
        "minimum": _NUMBER["minimum"],
        "maximum": _NUMBER["maximum"],
    },
    "Attributes": {
        "type": "object",
        "description": f"At most {MAX_ATTRIBUTES} attributes, each a flat value.",
        "maxProperties": MAX_ATTRIBUTES,
        "propertyNames": {"pattern": ATTRIBUTE_KEY_PATTERN},
        "additionalProperties": _ref("AttributeValue"),
        "examples": [{"colour": "red", "year": 2024}],
    },
    "RangeBound": {
        "description": "A number, or an ISO 8601 date (2024-05-01) or date-time with a time "
        "zone (2024-05-01T12:00:00Z).",
        "anyOf": [_NUMBER, {"type": "string", "format": "date"}, _DATE_TIME],
    },
    "DateBound": {
        "description": "An ISO 8601 date or date-time with a time zone.",
        "anyOf": [{"type": "string", "format": "date"}, _DATE_TIME],
    },
    "AttributeCondition": {
        "description": "A value (equal to), a list of values (equal to one of them), or an "
        "object of operators that must all hold.",
        "anyOf": [
            _ref("AttributeValue"),
            _non_empty_list(_ref("AttributeValue")),
            {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "$eq": _ref("AttributeValue"),
                    "$ne": _ref("AttributeValue"),
                    "$in": _non_empty_list(_ref("AttributeValue")),
                    "$nin": _non_empty_list(_ref("AttributeValue")),
                    "$exists": {"type": "boolean"},
                    **{op: _ref("RangeBound") for op in _RANGE_OPS},
                },
            },
        ],
    },
    "Tag": {"type": "string", "pattern": TAG_PATTERN},
    "TagCondition": {
        "description": "A tag (has it), a list of tags (has one of them), or an object of "
        "$all / $any / $contains.",
        "anyOf": [
            _ref("Tag"),
            _non_empty_list(_ref("Tag")),
            {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "$all": _non_empty_list(_ref("Tag")),
                    "$any": _non_empty_list(_ref("Tag")),
                    "$contains": _ref("Tag"),
                },
            },
        ],
    },
    "TimeCondition": {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": {op: _ref("DateBound") for op in _RANGE_OPS},
    },
    "Filter": {
        "type": "object",
        "description": "Every member must hold: attribute conditions, $tags, $created_at / "
        "$updated_at ranges, and $and / $or / $not of filters. At most "
        f"{MAX_FILTER_DEPTH} levels of nesting, {MAX_FILTER_CONDITIONS} conditions and "
        f"{MAX_FILTER_VALUES} listed values in all; docs/metadata.md has examples.",
        "propertyNames": {
            "anyOf": [{"enum": list(_MEMBER_OPS)}, {"pattern": ATTRIBUTE_KEY_PATTERN}]
        },
        "properties": {
            "$and": _non_empty_list(_ref("Filter")),
            "$or": _non_empty_list(_ref("Filter")),
            "$not": _ref("Filter"),
            "$tags": _ref("TagCondition"),
            "$created_at": _ref("TimeCondition"),
            "$updated_at": _ref("TimeCondition"),
        },
        "additionalProperties": _ref("AttributeCondition"),
        "examples": [{"colour": "red"}, {"colour": ["red", "blue"], "year": {"$gte": 2020}}],
    },
}


def component_schema(name: str, *, nullable: bool = False) -> Callable[[dict[str, Any]], None]:
    """A ``json_schema_extra`` that makes a field's schema the object component ``name`` (or
    null, with ``nullable``), keeping its title, description and examples."""

    def replace(schema: dict[str, Any]) -> None:
        kept = {k: v for k, v in schema.items() if k in ("title", "description", "examples")}
        schema.clear()
        # A bare $ref beside other keys would send pydantic looking for it among its own models.
        schema.update(
            {"anyOf": [_ref(name), {"type": "null"}]}
            if nullable
            else {"type": "object", "allOf": [_ref(name)]}
        )
        schema.update(kept)

    return replace
