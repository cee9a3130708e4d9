"""Bounds on client input, on SQLite and PostgreSQL: every filter within the documented limits
is answered (never a 5xx, however it is built), every one past them is a 422 before any SQL,
long value lists travel as one parameter, and JSON in form fields is measured before it is
parsed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from services.metadata.filters import MAX_CONDITIONS, MAX_DEPTH, compile_filter, parse_filter
from services.metadata.settings import MetadataSettings
from services.metadata.validation import (
    MAX_ATTRIBUTE_CHARS,
    MAX_ATTRIBUTES,
    MAX_ATTRIBUTES_JSON_CHARS,
    MAX_FILTER_VALUES,
)
from shared.bounded_json import MAX_JSON_DEPTH
from tests.services.metadata.support import assert_problem, create_indexed, upload


@pytest.fixture
def settings(settings: MetadataSettings) -> MetadataSettings:
    """PostgreSQL cancels a statement after a minute: a filter it cannot plan (as once a few
    hundred EXISTS under one AND) fails the test instead of holding it for hours. Answers here
    take well under a second."""
    url = make_url(settings.database_url)
    if url.get_backend_name() != "postgresql":
        return settings
    options = f"{url.query.get('options', '')} -cstatement_timeout=60s".strip()
    url = url.update_query_dict({"options": options})
    return settings.model_copy(update={"database_url": url.render_as_string(hide_password=False)})


def nested_first(levels: int, siblings: int) -> dict[str, Any]:
    """``levels`` of alternating $and/$or, the deeper group first at each level: SQLite parses
    ``a OR b OR c`` left-deep, so the first term is the deepest one."""
    node: dict[str, Any] = {"n": {"$gt": 0}}
    for level in range(levels):
        op = "$or" if level % 2 else "$and"
        node = {op: [node, *({f"k{level}": {"$ne": i}} for i in range(siblings))]}
    return node


# The largest filters of each shape the limits allow (MAX_CONDITIONS conditions,
# MAX_FILTER_VALUES values, MAX_DEPTH levels).
LARGEST: dict[str, Any] = {
    "$or of ranges": {"$or": [{"n": {"$gte": i, "$lt": i + 1}} for i in range(128)]},
    "attributes side by side": {f"k{i}": {"$lte": "2024-05-01"} for i in range(MAX_CONDITIONS)},
    "$in": {"group": {"$in": [f"g{i}" for i in range(997)] + [5, None, True]}},
    "$nin": {"group": {"$nin": list(range(MAX_FILTER_VALUES))}},
    "lists": {"$or": [{f"k{i}": ["a", "b", 1, 2.5]} for i in range(250)]},
    "$tags $all": {"$tags": {"$all": [f"t{i}" for i in range(MAX_FILTER_VALUES)]}},
    # Each a subquery; PostgreSQL once planned 128 EXISTS under one AND for seconds, 256 for
    # minutes.
    "$tags conditions": {"$and": [{"$tags": [f"t{i}", "x"]} for i in range(MAX_CONDITIONS)]},
    "$not": {"$and": [{"$not": {"group": f"g{i}"}} for i in range(MAX_CONDITIONS)]},
    "nested": nested_first(MAX_DEPTH, 31),
    "empty objects": {"$or": [{} for _ in range(MAX_CONDITIONS)]},
}


@pytest.fixture
def groups(client: TestClient) -> dict[str, int]:
    items = {
        "g5": create_indexed(client, attributes={"group": "g5", "n": 3}, tags=["t1", "t2"]),
        "five": create_indexed(client, attributes={"group": 5}, tags=["t1"]),
        "five.0": create_indexed(client, attributes={"group": 5.0}),
        "text 5": create_indexed(client, attributes={"group": "5"}),
        "true": create_indexed(client, attributes={"group": True}),
        "one": create_indexed(client, attributes={"group": 1}),
        "null": create_indexed(client, attributes={"group": None}),
        "none": create_indexed(client, attributes={}),
    }
    return {name: item["id"] for name, item in items.items()}


def matching(client: TestClient, filters: Any) -> list[int]:
    response = client.post("/collections/photos/filter", json={"filters": filters})
    assert response.status_code == 200, response.text
    return response.json()["item_ids"]


def named(groups: dict[str, int], *names: str) -> list[int]:
    return sorted(groups[n] for n in names)


def test_long_value_lists_keep_their_meaning(client: TestClient, groups: dict[str, int]) -> None:
    many = [f"g{i}" for i in range(MAX_FILTER_VALUES - 2)]
    assert matching(client, {"group": {"$in": many}}) == named(groups, "g5")
    # JSON types hold in a long list as in a short one: 5 matches 5 and 5.0, never "5" or true;
    # null only an explicit null.
    assert matching(client, {"group": {"$in": [*many, 5]}}) == named(groups, "g5", "five", "five.0")
    assert matching(client, {"group": [*many, "5", None]}) == named(groups, "g5", "text 5", "null")
    assert matching(client, {"group": {"$in": [*many, True]}}) == named(groups, "g5", "true")
    assert matching(client, {"group": {"$in": [*range(2, 900), 1.0]}}) == named(
        groups, "five", "five.0", "one"
    )
    # Not one of them: items without the attribute included.
    assert matching(client, {"group": {"$nin": [*many, 5, True]}}) == named(
        groups, "text 5", "one", "null", "none"
    )
    tags = [f"t{i}" for i in range(3, MAX_FILTER_VALUES)]
    assert matching(client, {"$tags": [*tags, "t2"]}) == named(groups, "g5")
    assert matching(client, {"$tags": {"$all": ["t1", "t2", "t1"]}}) == named(groups, "g5")
    assert matching(client, {"$tags": {"$all": [*tags, "t1"]}}) == []
    assert matching(client, {"$tags": {"$any": [*tags, "t1"]}}) == named(groups, "g5", "five")


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect()], ids=["sqlite", "pg"])
def test_a_value_list_is_one_parameter_however_long(dialect: Any) -> None:
    def parameters(filters: dict[str, Any]) -> int:
        clause = compile_filter(parse_filter(filters), dialect.name)
        assert clause is not None
        return len(clause.compile(dialect=dialect).params)

    for make in (
        lambda n: {"a": {"$in": [f"v{i}" for i in range(n)]}},
        lambda n: {"a": {"$nin": list(range(n))}},
        lambda n: {"$tags": {"$all": [f"t{i}" for i in range(n)]}},
        lambda n: {"$tags": [f"t{i}" for i in range(n)]},
    ):
        assert parameters(make(2)) == parameters(make(MAX_FILTER_VALUES))


@pytest.mark.parametrize("filters", LARGEST.values(), ids=LARGEST.keys())
def test_the_largest_allowed_filters_are_answered(
    client: TestClient, groups: dict[str, int], filters: Any
) -> None:
    parse_filter(filters)  # within every limit
    assert isinstance(matching(client, filters), list)
    response = client.post(
        "/collections/photos/keyword-search",
        json={"query": "cat", "top_k": 5, "target": "image", "filters": filters},
    )
    assert response.status_code == 200, response.text


def deep_not(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"a": 1}
    for _ in range(levels):
        node = {"$not": node}
    return node


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        (deep_not(MAX_DEPTH + 1), f"at most {MAX_DEPTH} levels"),
        ({"$or": [{"a": i} for i in range(MAX_CONDITIONS + 1)]}, f"{MAX_CONDITIONS} conditions"),
        ({"$or": [{} for _ in range(MAX_CONDITIONS + 1)]}, f"{MAX_CONDITIONS} conditions"),
        ({"a": {"$in": list(range(MAX_FILTER_VALUES + 1))}}, f"{MAX_FILTER_VALUES} values"),
        (
            {"a": list(range(MAX_FILTER_VALUES)), "$tags": ["x"]},
            f"{MAX_FILTER_VALUES} values",
        ),
        ({"a": "x" * (MAX_ATTRIBUTE_CHARS + 1)}, f"{MAX_ATTRIBUTE_CHARS} characters"),
        # Not text for either database (PostgreSQL refuses NUL; a lone surrogate is no UTF-8).
        ({"a": "x\u0000"}, "NUL"),
        ({"a": ["x", "\ud800"]}, "surrogate"),
        ({"$or": [{"\udfff": 1}]}, "surrogate"),
        ({"$tags": ["\ud83d"]}, "surrogate"),
    ],
    ids=[
        "depth",
        "conditions",
        "empty objects",
        "values",
        "values in all",
        "string",
        "nul",
        "surrogate value",
        "surrogate key",
        "surrogate tag",
    ],
)
def test_filters_past_a_limit_are_422(client: TestClient, filters: Any, message: str) -> None:
    create_indexed(client)
    for path, extra in (
        ("filter", {}),
        ("keyword-search", {"query": "cat", "top_k": 5, "target": "image"}),
    ):
        response = client.post(
            f"/collections/photos/{path}",
            # json.dumps writes a lone surrogate as an escape, as any JSON encoder may.
            content=json.dumps({"filters": filters, **extra}),
            headers={"Content-Type": "application/json"},
        )
        body = assert_problem(response, 422, "invalid_filter")
        assert message in body["detail"] and body["pointer"].startswith("/filters")


def test_json_too_deep_to_parse_is_a_4xx(client: TestClient) -> None:
    create_indexed(client)
    for levels in (MAX_JSON_DEPTH * 10, 100_000):
        text = '{"filters": ' + '{"$not": ' * levels + "{}" + "}" * levels + "}"
        response = client.post(
            "/collections/photos/filter",
            content=text,
            headers={"Content-Type": "application/json"},
        )
        assert 400 <= response.status_code < 500, response.text


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ('{"a": ' * 10_000 + "1" + "}" * 10_000, f"at most {MAX_JSON_DEPTH} levels"),
        ("[" * 1000, f"at most {MAX_JSON_DEPTH} levels"),
        ('{"a": "' + "x" * MAX_ATTRIBUTES_JSON_CHARS + '"}', f"{MAX_ATTRIBUTES_JSON_CHARS}"),
        ('{"a": [[1]]}', "values must be"),
        (json.dumps({f"k{i}": i for i in range(MAX_ATTRIBUTES + 1)}), f"{MAX_ATTRIBUTES}"),
        (json.dumps({"a": "x" * (MAX_ATTRIBUTE_CHARS + 1)}), f"{MAX_ATTRIBUTE_CHARS}"),
        ('{"a": 1', "not valid JSON"),
        ('{"a": "\\u0000"}', "NUL"),
        ('{"a": "\\ud800"}', "surrogate"),
    ],
    ids=[
        "nested",
        "open brackets",
        "long",
        "flat",
        "count",
        "string",
        "broken",
        "nul",
        "surrogate",
    ],
)
def test_attributes_past_a_limit_are_422(client: TestClient, attributes: str, message: str) -> None:
    body = assert_problem(upload(client, attributes=attributes), 422, "invalid_attributes")
    assert message in body["detail"]


def test_the_largest_attributes_are_stored(client: TestClient) -> None:
    # Every character escaped (\u00e9, six characters each): still within the JSON bound.
    attributes = {f"k{i:02d}": "é" * MAX_ATTRIBUTE_CHARS for i in range(MAX_ATTRIBUTES)}
    text = json.dumps(attributes, ensure_ascii=True)
    assert len(text) > 6 * MAX_ATTRIBUTE_CHARS * MAX_ATTRIBUTES
    item = create_indexed(client, attributes=text)
    assert item["attributes"] == attributes


def test_a_caption_that_is_not_text_is_422(client: TestClient) -> None:
    response = upload(client, captions=["a cat", "a\x00dog"])
    assert "NUL" in assert_problem(response, 422, "invalid_caption")["detail"]


def test_dates_at_the_ends_of_the_calendar_are_answered(
    client: TestClient, groups: dict[str, int]
) -> None:
    # A year before 1000 keeps its four digits once in UTC (it once failed to parse back: 500).
    everything = sorted(groups.values())
    assert matching(client, {"$created_at": {"$gt": "0827-12-24T18:55:53+01:00"}}) == everything
    assert matching(client, {"n": {"$gt": "0827-12-24T18:55:53Z"}}) == []
    # Past the calendar once in UTC: refused, not an overflow.
    for bound in ("0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00"):
        response = client.post(
            "/collections/photos/filter", json={"filters": {"$updated_at": {"$lt": bound}}}
        )
        assert "years 1 to 9999" in assert_problem(response, 422, "invalid_filter")["detail"]
