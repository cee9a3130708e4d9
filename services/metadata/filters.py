"""The filter language: JSON in, a parsed tree, then a parameterised SQLAlchemy condition out.

Grammar (docs/metadata.md has examples)::

    filter    := null | object                      null and {} match every item
    object    := {member, ...}                       every member must hold
    member    := "$and": [object, ...]               all of them
               | "$or":  [object, ...]               at least one
               | "$not": object                      not that
               | "$tags": tags                       tag conditions
               | "$created_at" | "$updated_at": {range-op: date, ...}
               | attribute: condition
    condition := scalar                              equal to
               | [scalar, ...]                       equal to one of
               | {op: operand, ...}                  every operator must hold
    op        := $eq scalar | $ne scalar | $in [scalars] | $nin [scalars] | $exists bool
               | $gt | $gte | $lt | $lte  number or ISO 8601 date
    tags      := "tag"                               has that tag
               | ["a", "b"]                          has at least one of them
               | {"$all": [...], "$any": [...], "$contains": "tag"}

Attribute names never start with ``$``, so the older form ``{attribute: value | [values]}`` is
this language's simplest case and keeps its meaning. Every mistake is a 422 ``invalid_filter``
problem whose ``pointer`` (a JSON Pointer into the request body) names the bad part.

Nothing from the request is ever spliced into SQL text: values become bound parameters, and
attribute names, which appear inside SQLite JSON paths, are themselves bound and limited to a safe
alphabet.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Final, Literal

from sqlalchemy import (
    ARRAY,
    Boolean,
    ColumnElement,
    Numeric,
    String,
    and_,
    any_,
    case,
    cast,
    false,
    func,
    not_,
    or_,
    select,
    true,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import JSONB

from services.metadata.models import Item, ItemTag
from services.metadata.validation import ATTRIBUTE_KEY, MAX_FILTER_VALUES, TAG, scalar_problem
from shared.bounded_json import json_problem
from shared.problems import Unprocessable

Scalar = str | int | float | bool | None
RangeOp = Literal["gt", "gte", "lt", "lte"]

MAX_DEPTH: Final = 8
MAX_CONDITIONS: Final = 256
_RANGE_OPS: Final = ("$gt", "$gte", "$lt", "$lte")
_ATTRIBUTE_OPS: Final = ("$eq", "$ne", "$in", "$nin", "$exists", *_RANGE_OPS)
_MEMBER_OPS: Final = ("$and", "$or", "$not", "$tags", "$created_at", "$updated_at")
_TAG_OPS: Final = ("$all", "$any", "$contains")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")
# What a stored date attribute must look like to take part in a date range.
_SQLITE_DATE_GLOB = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*"
_PG_DATE_REGEX = r"^\d{4}-\d{2}-\d{2}"


# --- the parsed tree ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Equals:
    key: str
    values: tuple[Scalar, ...]  # equal to any of them


@dataclass(frozen=True)
class Range:
    key: str
    op: RangeOp
    bound: int | float | str  # a number, or a canonical ISO 8601 date / UTC date-time string


@dataclass(frozen=True)
class Exists:
    key: str


@dataclass(frozen=True)
class HasTags:
    tags: tuple[str, ...]
    mode: Literal["all", "any"]


@dataclass(frozen=True)
class TimeRange:
    field: Literal["created_at", "updated_at"]
    op: RangeOp
    bound: datetime


@dataclass(frozen=True)
class And:
    children: tuple[Node, ...] = ()


@dataclass(frozen=True)
class Or:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    child: Node


Node = Equals | Range | Exists | HasTags | TimeRange | And | Or | Not
MATCH_ALL: Final = And()


# --- parsing -----------------------------------------------------------------------------------


def _escape(token: str) -> str:
    # RFC 6901: '~' and '/' inside a reference token.
    return token.replace("~", "~0").replace("/", "~1")


def invalid_filter(message: str, pointer: str) -> Unprocessable:
    return Unprocessable(
        f"{message} (at {pointer or '/'})", code="invalid_filter", extra={"pointer": pointer}
    )


@dataclass
class _Parser:
    values: int = 0
    conditions: int = 0
    pointers: list[str] = field(default_factory=list)

    def count(self, pointer: str, values: int = 1) -> None:
        self.conditions += 1
        self.values += values
        if self.conditions > MAX_CONDITIONS:
            raise invalid_filter(f"a filter has at most {MAX_CONDITIONS} conditions", pointer)
        if self.values > MAX_FILTER_VALUES:
            raise invalid_filter(f"filters list at most {MAX_FILTER_VALUES} values in all", pointer)

    def object(self, raw: Any, pointer: str, depth: int) -> Node:
        if not isinstance(raw, dict):
            raise invalid_filter("a filter must be a JSON object", pointer)
        if depth > MAX_DEPTH:
            raise invalid_filter(f"filters nest at most {MAX_DEPTH} levels deep", pointer)
        if not raw and depth:
            # {} inside $and/$or/$not holds for every item: a condition like any other, so a
            # list of a million of them is refused like a million conditions.
            self.count(pointer, 0)
        parts: list[Node] = []
        for key, value in raw.items():
            here = f"{pointer}/{_escape(key)}"
            if key.startswith("$"):
                parts.append(self.member(key, value, here, depth))
            else:
                if not ATTRIBUTE_KEY.fullmatch(key):
                    raise invalid_filter(
                        f"attribute name {key[:80]!r} must match {ATTRIBUTE_KEY.pattern}", here
                    )
                parts.append(self.condition(key, value, here))
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def member(self, key: str, value: Any, pointer: str, depth: int) -> Node:
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise invalid_filter(f"{key} takes a non-empty list of filters", pointer)
            children = tuple(
                self.object(child, f"{pointer}/{i}", depth + 1) for i, child in enumerate(value)
            )
            return And(children) if key == "$and" else Or(children)
        if key == "$not":
            return Not(self.object(value, pointer, depth + 1))
        if key == "$tags":
            return self.tags(value, pointer)
        if key in ("$created_at", "$updated_at"):
            return self.time_range(key[1:], value, pointer)  # type: ignore[arg-type]
        raise invalid_filter(
            f"unknown operator {key[:40]!r}; here one of {', '.join(_MEMBER_OPS)} "
            "or an attribute name",
            pointer,
        )

    def scalar(self, value: Any, pointer: str) -> Scalar:
        problem = scalar_problem(value)
        if problem:
            raise invalid_filter(problem, pointer)
        return value  # type: ignore[no-any-return]

    def scalars(self, value: Any, pointer: str, what: str) -> tuple[Scalar, ...]:
        if not isinstance(value, list) or not value:
            # "one of no values" is almost certainly a caller bug; say so rather than match nothing.
            raise invalid_filter(f"{what} takes a non-empty list of values", pointer)
        return tuple(self.scalar(v, f"{pointer}/{i}") for i, v in enumerate(value))

    def condition(self, key: str, value: Any, pointer: str) -> Node:
        if isinstance(value, list):
            values = self.scalars(value, pointer, "a list")
            self.count(pointer, len(values))
            return Equals(key, values)
        if not isinstance(value, dict):
            self.count(pointer)
            return Equals(key, (self.scalar(value, pointer),))
        if not value:
            raise invalid_filter("an operator object needs at least one operator", pointer)
        parts: list[Node] = []
        for op, operand in value.items():
            here = f"{pointer}/{_escape(op)}"
            if op not in _ATTRIBUTE_OPS:
                raise invalid_filter(
                    f"unknown operator {op[:40]!r}; use one of {', '.join(_ATTRIBUTE_OPS)}", here
                )
            if op in ("$eq", "$ne"):
                self.count(here)
                node: Node = Equals(key, (self.scalar(operand, here),))
                parts.append(Not(node) if op == "$ne" else node)
            elif op in ("$in", "$nin"):
                values = self.scalars(operand, here, op)
                self.count(here, len(values))
                node = Equals(key, values)
                parts.append(Not(node) if op == "$nin" else node)
            elif op == "$exists":
                if not isinstance(operand, bool):
                    raise invalid_filter("$exists takes true or false", here)
                self.count(here)
                parts.append(Exists(key) if operand else Not(Exists(key)))
            else:
                self.count(here)
                parts.append(Range(key, op[1:], range_bound(operand, here)))  # type: ignore[arg-type]
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def tag(self, value: Any, pointer: str) -> str:
        if not isinstance(value, str) or not TAG.fullmatch(value):
            raise invalid_filter(
                "a tag is a string of 1-64 letters, digits and separators", pointer
            )
        return value

    def tag_list(self, value: Any, pointer: str, what: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise invalid_filter(f"{what} takes a non-empty list of tags", pointer)
        tags = tuple(self.tag(v, f"{pointer}/{i}") for i, v in enumerate(value))
        self.count(pointer, len(tags))
        return tags

    def tags(self, value: Any, pointer: str) -> Node:
        if isinstance(value, str):
            self.count(pointer)
            return HasTags((self.tag(value, pointer),), "all")
        if isinstance(value, list):
            return HasTags(self.tag_list(value, pointer, "$tags"), "any")
        if not isinstance(value, dict) or not value:
            raise invalid_filter(
                "$tags takes a tag, a list of tags, or an object of $all/$any/$contains", pointer
            )
        parts: list[Node] = []
        for op, operand in value.items():
            here = f"{pointer}/{_escape(op)}"
            if op == "$contains":
                self.count(here)
                parts.append(HasTags((self.tag(operand, here),), "all"))
            elif op in ("$all", "$any"):
                parts.append(HasTags(self.tag_list(operand, here, op), op[1:]))  # type: ignore[arg-type]
            else:
                raise invalid_filter(
                    f"unknown tag operator {op[:40]!r}; use one of {', '.join(_TAG_OPS)}", here
                )
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def time_range(
        self, name: Literal["created_at", "updated_at"], value: Any, pointer: str
    ) -> Node:
        if not isinstance(value, dict) or not value:
            raise invalid_filter(
                f"${name} takes an object of {', '.join(_RANGE_OPS)} with dates", pointer
            )
        parts: list[Node] = []
        for op, operand in value.items():
            here = f"{pointer}/{_escape(op)}"
            if op not in _RANGE_OPS:
                raise invalid_filter(
                    f"unknown operator {op[:40]!r}; use one of {', '.join(_RANGE_OPS)}", here
                )
            bound = range_bound(operand, here)
            if not isinstance(bound, str):
                raise invalid_filter("timestamps compare with ISO 8601 dates only", here)
            self.count(here)
            parts.append(TimeRange(name, op[1:], _as_datetime(bound)))  # type: ignore[arg-type]
        return parts[0] if len(parts) == 1 else And(tuple(parts))


def range_bound(value: Any, pointer: str) -> int | float | str:
    """A range operand: a finite number, or an ISO 8601 date (``2024-05-01``) or date-time with a
    time zone (``2024-05-01T12:00:00Z``), returned in canonical form (UTC, ``Z``)."""
    if isinstance(value, bool):
        raise invalid_filter("range bounds are numbers or ISO 8601 dates, not booleans", pointer)
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise invalid_filter("numbers must be finite", pointer)
        problem = scalar_problem(value)
        if problem:
            raise invalid_filter(problem, pointer)
        return value
    if isinstance(value, str):
        try:
            if _DATE.fullmatch(value):
                return date.fromisoformat(value).isoformat()
            if _DATETIME.match(value):
                parsed = datetime.fromisoformat(value)
                if parsed.tzinfo is None:
                    raise invalid_filter(
                        "date-times need a time zone, e.g. 2024-05-01T12:00:00Z", pointer
                    )
                return canonical_datetime(parsed)
        except ValueError:
            pass
        except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the first year in UTC
            raise invalid_filter("dates lie within years 1 to 9999 in UTC", pointer) from None
    raise invalid_filter(
        "range bounds are numbers or ISO 8601 dates (2024-05-01 or 2024-05-01T12:00:00Z)",
        pointer,
    )


def canonical_datetime(value: datetime) -> str:
    """UTC, second precision unless there are fractions: the form date attributes should use so
    that comparing them as strings compares them in time."""
    value = value.astimezone(UTC)
    # isoformat, not strftime("%Y"): glibc writes the year 827 as "827", which neither sorts
    # nor parses back.
    text = value.replace(microsecond=0, tzinfo=None).isoformat()
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return text + "Z"


def _as_datetime(bound: str) -> datetime:
    if _DATE.fullmatch(bound):
        return datetime.fromisoformat(bound).replace(tzinfo=UTC)
    return datetime.fromisoformat(bound.replace("Z", "+00:00"))


def parse_filter(raw: Any, pointer: str = "/filters") -> Node:
    """The tree of a filter; ``null`` and ``{}`` match everything. Raises ``invalid_filter``."""
    if raw is None:
        return MATCH_ALL
    # Before the parser: its messages quote keys, which must be text (see bounded_json).
    problem = json_problem(raw)
    if problem:
        raise invalid_filter(f"filters {problem}", pointer)
    return _Parser().object(raw, pointer, 0)


# --- compiling to SQL --------------------------------------------------------------------------

_COMPARE: Final[dict[str, Callable[[Any, Any], ColumnElement[bool]]]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def attribute_equals(dialect: str, key: str, values: Sequence[Scalar]) -> ColumnElement[bool]:
    """``attributes[key]`` equal to one of ``values``, with JSON types respected (1 == 1.0, but
    "1" != 1 and true != 1; null matches an explicit null only). However many values there are,
    the SQL is the same small expression: a list is one bound parameter (an array on PostgreSQL,
    a JSON array read by ``json_each`` on SQLite), never one comparison per value, which would
    nest past SQLite's expression depth limit (1000) and cost a planner time per value."""
    if dialect == "postgresql":
        # JSONB containment compares numbers numerically and uses the GIN index.
        document = type_coerce(Item.attributes, JSONB)
        if len(values) == 1:
            return document.contains({key: values[0]})
        wanted = [{key: value} for value in values]
        return document.op("@>")(any_(cast(wanted, ARRAY(JSONB))))
    # SQLite: json_type tells null/true/false/integer/real/text apart, which json_extract
    # alone cannot (it returns 1 for both true and 1, and NULL for both null and missing).
    path = _sqlite_path(key)
    kind = func.json_type(Item.attributes, path)
    extracted = func.json_extract(Item.attributes, path)
    literals = sorted({_LITERAL_KIND[v] for v in values if v is None or isinstance(v, bool)})
    numbers = _distinct(v for v in values if isinstance(v, int | float) and not isinstance(v, bool))
    texts = _distinct(v for v in values if isinstance(v, str))
    parts: list[ColumnElement[bool]] = []
    if literals:
        parts.append(kind.in_(literals))
    if numbers:
        parts.append(and_(kind.in_(("integer", "real")), _sqlite_one_of(extracted, numbers)))
    if texts:
        parts.append(and_(kind == "text", _sqlite_one_of(extracted, texts)))
    return or_(*parts)


_LITERAL_KIND: Final[dict[bool | None, str]] = {None: "null", True: "true", False: "false"}


def _distinct(values: Iterable[Scalar]) -> list[Scalar]:
    return list(dict.fromkeys(values))


def _sqlite_one_of(expression: ColumnElement[Any], values: list[Any]) -> ColumnElement[bool]:
    """``expression IN values``: one value compared, several read from one JSON parameter."""
    if len(values) == 1:
        return expression == values[0]
    listed = func.json_each(json.dumps(values)).table_valued("value")
    return expression.in_(select(listed.c.value))


def _sqlite_path(key: str) -> str:
    # Bound as a parameter; keys match ATTRIBUTE_KEY, so no quote can change the path's meaning.
    return f'$."{key}"'


def _range(dialect: str, node: Range) -> ColumnElement[bool]:
    compare = _COMPARE[node.op]
    if dialect == "postgresql":
        document = type_coerce(Item.attributes, JSONB)
        element = document[node.key]
        kind = func.jsonb_typeof(element)
        if isinstance(node.bound, str):
            text = element.astext
            return and_(
                kind == "string",
                text.op("~")(_PG_DATE_REGEX),
                # Byte order: ISO 8601 strings sort in time order only without locale rules.
                compare(text.collate("C"), node.bound),
            )
        # CASE keeps the cast from ever seeing a non-number (it would raise, not be false).
        number = case((kind == "number", cast(element.astext, Numeric)), else_=None)
        return compare(number, Decimal(str(node.bound)))
    path = _sqlite_path(node.key)
    kind = func.json_type(Item.attributes, path)
    extracted = func.json_extract(Item.attributes, path)
    if isinstance(node.bound, str):
        return and_(
            kind == "text",
            extracted.op("GLOB")(_SQLITE_DATE_GLOB),
            compare(extracted, node.bound),
        )
    return and_(kind.in_(("integer", "real")), compare(extracted, node.bound))


def _exists(dialect: str, key: str) -> ColumnElement[bool]:
    if dialect == "postgresql":
        return type_coerce(Item.attributes, JSONB).has_key(key)
    return func.json_type(Item.attributes, _sqlite_path(key)).is_not(None)


def _has_tags(dialect: str, node: HasTags) -> ColumnElement[bool]:
    """How many of the tags the item has, counted by a subquery per item: one tag or a thousand
    are the same SQL (the list is one parameter). A count, not EXISTS: PostgreSQL turns each
    EXISTS under AND into a join to plan, and a hundred of them take minutes to plan."""
    tags = _distinct(node.tags)
    if len(tags) == 1:
        matching = ItemTag.tag == tags[0]
    elif dialect == "postgresql":
        matching = ItemTag.tag == any_(cast(tags, ARRAY(String)))
    else:
        matching = _sqlite_one_of(ItemTag.tag, tags)
    count = (
        select(func.count())
        .select_from(ItemTag)
        .where(ItemTag.item_id == Item.id, matching)
        .scalar_subquery()
    )
    return count >= 1 if node.mode == "any" else count == len(tags)


def compile_filter(node: Node, dialect: str) -> ColumnElement[bool] | None:
    """A condition on ``Item`` for ``node``; None when it matches every item."""
    if isinstance(node, And) and not node.children:
        return None
    return _compile(node, dialect)


def _compile(node: Node, dialect: str) -> ColumnElement[bool]:
    if isinstance(node, Equals):
        return attribute_equals(dialect, node.key, node.values)
    if isinstance(node, Range):
        return _range(dialect, node)
    if isinstance(node, Exists):
        return _exists(dialect, node.key)
    if isinstance(node, HasTags):
        return _has_tags(dialect, node)
    if isinstance(node, TimeRange):
        column = Item.created_at if node.field == "created_at" else Item.updated_at
        return _COMPARE[node.op](column, node.bound)
    if isinstance(node, And):
        if not node.children:  # {} nested somewhere: matches every item
            return true()
        return and_(*(_compile(child, dialect) for child in node.children))
    if isinstance(node, Or):
        return or_(*(_compile(child, dialect) for child in node.children))
    # NOT of SQL's "unknown" (a missing attribute compared) is unknown again, which would drop
    # the row; COALESCE makes "not equal" include items without the attribute, as documented.
    return not_(func.coalesce(_compile(node.child, dialect), false(), type_=Boolean))
