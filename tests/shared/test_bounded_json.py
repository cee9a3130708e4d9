"""JSON measured before it is parsed: nesting counted outside strings only, limits applied
before ``json.loads`` could recurse."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.bounded_json import (
    MAX_JSON_DEPTH,
    JsonBoundsError,
    json_problem,
    loads_bounded,
    text_depth,
)


@pytest.mark.parametrize(
    "value",
    [
        1,
        "[[{",
        [],
        {"a": [1, {"b": "]]}}"}]},
        {"s": 'a "quoted" [bracket] and \\ backslash \\"[', "t": [[["\\\\"]]]},
        [[[[[[]]]]], [[]]],
    ],
)
def test_text_depth_is_the_depth_of_the_parsed_value(value: Any) -> None:
    depth = _recursive_depth(value)
    assert text_depth(json.dumps(value)) == depth
    assert json_problem(value, max_depth=depth) is None
    if depth:
        assert "levels" in str(json_problem(value, max_depth=depth - 1))


def _recursive_depth(value: Any) -> int:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return 1 + max((_recursive_depth(v) for v in value), default=0)
    return 0


def test_counting_stops_past_the_limit() -> None:
    assert text_depth("[" * 100_000, limit=5) == 6
    deep: Any = 1
    for _ in range(100_000):  # far past the interpreter's recursion limit
        deep = {"a": [deep]}
    assert json_problem(deep) == f"nests at most {MAX_JSON_DEPTH} levels of arrays and objects"


def test_unpaired_surrogates_are_refused_where_a_pair_is_text() -> None:
    # "\ud83d\ude00" is one emoji once parsed; either half alone is not text.
    assert json_problem(json.loads('{"a": ["\\ud83d\\ude00"]}')) is None
    for text in ('{"a": ["x\\ud800"]}', '{"\\udfff": 1}', '"\\ude00\\ud83d"'):
        problem = json_problem(json.loads(text))
        assert problem is not None and "surrogate" in problem
        with pytest.raises(JsonBoundsError, match="surrogate"):
            loads_bounded(text, what="x", max_chars=100)


def test_loads_bounded_refuses_before_parsing() -> None:
    assert loads_bounded('{"a": [1]}', what="x", max_chars=10) == {"a": [1]}
    with pytest.raises(JsonBoundsError, match="at most 9 characters"):
        loads_bounded('{"a": [1]}', what="x", max_chars=9)
    # Deep enough to make json.loads raise RecursionError, short enough to pass the length bound.
    for text in ("[" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        with pytest.raises(JsonBoundsError, match=f"at most {MAX_JSON_DEPTH} levels"):
            loads_bounded(text, what="x", max_chars=10**6)
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert _recursive_depth(loads_bounded(ok, what="x", max_chars=10**6)) == MAX_JSON_DEPTH
    with pytest.raises(JsonBoundsError, match="levels"):
        loads_bounded("[" + ok + "]", what="x", max_chars=10**6)
    with pytest.raises(JsonBoundsError, match="not valid JSON"):
        loads_bounded('{"a": ', what="x", max_chars=100)
