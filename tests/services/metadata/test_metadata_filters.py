"""The filter language: parsing with pointed errors (no database), and its meaning in SQL on
SQLite and PostgreSQL through POST /collections/{c}/filter."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.dialects import postgresql, sqlite

from services.metadata.filters import (
    MAX_DEPTH,
    And,
    Equals,
    HasTags,
    Not,
    Range,
    compile_filter,
    parse_filter,
)
from shared.problems import ProblemError
from tests.services.metadata.support import assert_problem, create, create_indexed

# --- parsing ----------------------------------------------------------------------------------


def test_the_older_form_parses_to_equality() -> None:
    assert parse_filter(None) == And()
    assert parse_filter({}) == And()
    assert parse_filter({"colour": "red"}) == Equals("colour", ("red",))
    assert parse_filter({"colour": ["red", "blue"], "n": 1}) == And(
        (Equals("colour", ("red", "blue")), Equals("n", (1,)))
    )


def test_operators_parse() -> None:
    assert parse_filter({"n": {"$gte": 1, "$lt": 2.5}}) == And(
        (Range("n", "gte", 1), Range("n", "lt", 2.5))
    )
    assert parse_filter({"c": {"$ne": "x"}}) == Not(Equals("c", ("x",)))
    assert parse_filter({"$tags": ["a", "b"]}) == HasTags(("a", "b"), "any")
    # Date-times are compared in UTC, in one canonical spelling.
    assert parse_filter({"d": {"$gt": "2024-05-01T14:30:00+02:00"}}) == Range(
        "d", "gt", "2024-05-01T12:30:00Z"
    )


def pointer_of(raw: Any) -> str:
    with pytest.raises(ProblemError) as caught:
        parse_filter(raw)
    assert caught.value.code == "invalid_filter"
    assert caught.value.status == 422
    pointer = caught.value.extra["pointer"]
    assert pointer in caught.value.detail  # the pointer survives proxies that keep only detail
    return pointer


@pytest.mark.parametrize(
    ("raw", "pointer"),
    [
        ("colour=red", "/filters"),
        (["colour", "red"], "/filters"),
        ({"year": {"gte": 1}}, "/filters/year/gte"),
        ({"$or": [{"year": 1}, {"year": {"$gte": "soon"}}]}, "/filters/$or/1/year/$gte"),
        ({"$and": []}, "/filters/$and"),
        ({"$or": {"a": 1}}, "/filters/$or"),
        ({"$not": [{"a": 1}]}, "/filters/$not"),
        ({"$nope": 1}, "/filters/$nope"),
        ({"a/b": 1}, "/filters/a~1b"),
        ({"a": []}, "/filters/a"),
        ({"a": {}}, "/filters/a"),
        ({"a": ["x", ["y"]]}, "/filters/a/1"),
        ({"a": {"$in": "x"}}, "/filters/a/$in"),
        ({"a": {"$exists": "yes"}}, "/filters/a/$exists"),
        ({"a": {"$gt": True}}, "/filters/a/$gt"),
        ({"a": {"$gt": "2024-13-01"}}, "/filters/a/$gt"),
        ({"a": {"$lt": "2024-05-01T10:00:00"}}, "/filters/a/$lt"),  # no time zone
        ({"a": 2**64}, "/filters/a"),
        ({"$tags": {"$every": ["x"]}}, "/filters/$tags/$every"),
        ({"$tags": {"$all": []}}, "/filters/$tags/$all"),
        ({"$tags": ["ok", " padded"]}, "/filters/$tags/1"),
        ({"$tags": 3}, "/filters/$tags"),
        ({"$created_at": {"$gte": 5}}, "/filters/$created_at/$gte"),
        ({"$created_at": {"$eq": "2024-01-01"}}, "/filters/$created_at/$eq"),
    ],
)
def test_invalid_filters_point_at_the_bad_part(raw: Any, pointer: str) -> None:
    assert pointer_of(raw) == pointer


def test_nesting_and_size_are_limited() -> None:
    deep: dict[str, Any] = {"a": 1}
    for _ in range(MAX_DEPTH + 1):
        deep = {"$not": deep}
    assert pointer_of(deep).startswith("/filters/$not")
    pointer_of({"a": list(range(1001))})
    many = {"$or": [{"a": i} for i in range(300)]}
    assert pointer_of(many).startswith("/filters/$or/")


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect()], ids=["sqlite", "pg"])
def test_values_are_bound_never_spliced(dialect: Any) -> None:
    node = parse_filter(
        {
            "name": "x' OR '1'='1",
            "n": {"$gte": 3},
            "d": {"$lt": "2024-01-01"},
            "$tags": "o'clock",
        }
    )
    clause = compile_filter(node, dialect.name)
    assert clause is not None
    sql = str(clause.compile(dialect=dialect))
    for literal in ("x'", "'1'='1", "o'clock", "2024-01-01"):
        assert literal not in sql
    # ...they travel as parameters (on PostgreSQL inside a JSON document for containment).
    params = str(clause.compile(dialect=dialect).params.values())
    assert "x' OR '1'='1" in params and "o'clock" in params


# --- meaning, on both databases ---------------------------------------------------------------


@pytest.fixture
def shop(client: TestClient) -> dict[str, dict[str, Any]]:
    return {
        "a": create_indexed(
            client,
            captions=["a cat on a sofa"],
            tags=["pet", "indoor"],
            attributes={
                "animal": "cat",
                "year": 2020,
                "price": 9.5,
                "taken": "2021-03-04",
                "hd": True,
            },
        ),
        "b": create_indexed(
            client,
            captions=["a dog", "a puppy in a park"],
            tags=["pet", "outdoor"],
            attributes={
                "animal": "dog",
                "year": 2021,
                "price": 20,
                "taken": "2021-06-01T10:00:00Z",
            },
        ),
        "c": create_indexed(
            client,
            tags=["wild"],
            attributes={"animal": "bird", "year": "2020", "price": "cheap", "taken": "not a date"},
        ),
        "d": create_indexed(client, attributes={"animal": "cat", "year": 2019}),
        "pending": create(client, tags=["pet"], attributes={"animal": "cat", "year": 2020}),
    }


def matching(client: TestClient, filters: Any) -> list[int]:
    response = client.post("/collections/photos/filter", json={"filters": filters})
    assert response.status_code == 200, response.text
    return response.json()["item_ids"]


def ids(shop: dict[str, dict[str, Any]], names: str) -> list[int]:
    return sorted(shop[n]["id"] for n in names)


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        # numeric ranges: numbers only; the string "2020" and "cheap" never compare
        ({"year": {"$gte": 2020}}, "ab"),
        ({"year": {"$lt": 2020}}, "d"),
        ({"price": {"$gt": 9.5, "$lte": 20}}, "b"),
        ({"price": {"$lt": 100}}, "ab"),
        # date ranges over ISO 8601 strings; "not a date" never compares
        ({"taken": {"$gte": "2021-03-01", "$lt": "2021-04-01"}}, "a"),
        ({"taken": {"$gt": "2000-01-01"}}, "ab"),
        ({"taken": {"$gte": "2021-06-01T11:30:00+02:00"}}, "b"),
        ({"taken": {"$gte": "2021-06-01T10:00:01Z"}}, ""),
        # set membership and inequality (missing attributes are "not equal")
        ({"animal": {"$in": ["dog", "bird"]}}, "bc"),
        ({"animal": {"$nin": ["cat"]}}, "bc"),
        ({"animal": {"$ne": "cat"}}, "bc"),
        ({"price": {"$ne": 20}}, "acd"),
        ({"hd": {"$eq": True}}, "a"),
        ({"price": {"$exists": False}}, "d"),
        ({"taken": {"$exists": True}}, "abc"),
        # tags
        ({"$tags": "pet"}, "ab"),
        ({"$tags": ["wild", "indoor"]}, "ac"),
        ({"$tags": {"$all": ["pet", "outdoor"]}}, "b"),
        ({"$tags": {"$contains": "pet", "$any": ["indoor", "wild"]}}, "a"),
        ({"$tags": "nope"}, ""),
        # boolean structure
        ({"$or": [{"animal": "bird"}, {"year": {"$lt": 2020}}]}, "cd"),
        ({"$not": {"$tags": "pet"}}, "cd"),
        ({"$and": [{"animal": "cat"}, {"$not": {"year": 2019}}]}, "a"),
        (
            {"$or": [{"$and": [{"$tags": "pet"}, {"price": {"$gte": 10}}]}, {"animal": "bird"}]},
            "bc",
        ),
        ({"$or": [{}, {"animal": "nothing"}]}, "abcd"),
        # item timestamps
        ({"$created_at": {"$gte": "2000-01-01"}}, "abcd"),
        ({"$created_at": {"$lt": "2000-01-01"}}, ""),
        ({"$updated_at": {"$lte": "2999-01-01T00:00:00Z"}}, "abcd"),
        # nothing from a value reaches the SQL text
        ({"animal": "x' OR '1'='1"}, ""),
    ],
)
def test_filter_language(
    client: TestClient, shop: dict[str, dict[str, Any]], filters: Any, expected: str
) -> None:
    assert matching(client, filters) == ids(shop, expected)


def test_captions_follow_their_items(client: TestClient, shop: dict[str, dict[str, Any]]) -> None:
    response = client.post("/collections/photos/filter", json={"filters": {"$tags": "pet"}})
    expected = sorted(c["id"] for n in "ab" for c in shop[n]["captions"])
    assert response.json()["caption_ids"] == expected


def test_a_target_asks_for_one_list_only(
    client: TestClient, shop: dict[str, dict[str, Any]]
) -> None:
    both = client.post("/collections/photos/filter", json={"filters": {"$tags": "pet"}}).json()
    images = client.post(
        "/collections/photos/filter", json={"filters": {"$tags": "pet"}, "target": "image"}
    ).json()
    texts = client.post(
        "/collections/photos/filter", json={"filters": {"$tags": "pet"}, "target": "text"}
    ).json()
    assert images == {"item_ids": both["item_ids"], "caption_ids": None}
    assert texts == {"item_ids": None, "caption_ids": both["caption_ids"]}
    assert both["item_ids"] == ids(shop, "ab")


def test_invalid_filter_problem_names_the_pointer(client: TestClient) -> None:
    create_indexed(client)
    response = client.post(
        "/collections/photos/filter", json={"filters": {"$or": [{"year": {"$between": [1, 2]}}]}}
    )
    body = assert_problem(response, 422, "invalid_filter")
    assert body["pointer"] == "/filters/$or/0/year/$between"
