"""The gateway's own bounds on JSON from clients, applied before any downstream call: filters
(a JSON body's member or a form field) and an item's attributes (a form field) too deep, too
long or not JSON are a 422 problem, never a RecursionError or a serialisation failure."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.gateway.schemas import (
    MAX_ATTRIBUTES_JSON_CHARS,
    MAX_FILTER_JSON_CHARS,
    TextSearchRequest,
    check_attributes_form,
    parse_filters_form,
)
from shared.bounded_json import MAX_JSON_DEPTH
from shared.problems import ProblemError


def nested(levels: int) -> str:
    return '{"$not": ' * levels + "{}" + "}" * levels


def refused(call: Any, *args: Any) -> ProblemError:
    with pytest.raises(ProblemError) as raised:
        call(*args)
    assert raised.value.status == 422
    return raised.value


def test_filters_form_field_is_measured_before_it_is_parsed() -> None:
    assert parse_filters_form(nested(MAX_JSON_DEPTH - 1)) is not None
    assert parse_filters_form(" ") is None
    for text in (nested(1000), nested(6000), "[" * 60_000):
        problem = refused(parse_filters_form, text)
        assert problem.code == "invalid_filter"
        assert f"at most {MAX_JSON_DEPTH} levels" in problem.detail
    long = json.dumps({"a": "x" * MAX_FILTER_JSON_CHARS})
    assert str(MAX_FILTER_JSON_CHARS) in refused(parse_filters_form, long).detail
    for text in ("{not json", "[1, 2]", '"a"', '{"a": "\\ud800"}'):
        assert refused(parse_filters_form, text).code == "invalid_filter"


def test_filters_in_a_json_body_are_bounded_in_depth() -> None:
    body = {"query": "a red circle", "filters": json.loads(nested(MAX_JSON_DEPTH - 1))}
    assert TextSearchRequest.model_validate(body).filters == body["filters"]
    # 300 levels parse (json.loads goes to ~1000) but cannot be serialised for the metadata
    # service (pydantic stops at ~255): refused before, with the filter's problem code.
    for levels in (MAX_JSON_DEPTH, 300, 900):
        body = {"query": "a red circle", "filters": json.loads(nested(levels))}
        problem = refused(TextSearchRequest.model_validate, body)
        assert problem.code == "invalid_filter"
    # Valid JSON ("\ud800"), but not text: it could not be sent on either.
    body = {"query": "a red circle", "filters": {"$or": [{"a": "x\ud800"}]}}
    assert "surrogate" in refused(TextSearchRequest.model_validate, body).detail


def test_attributes_form_field_is_checked_before_the_image_is_embedded() -> None:
    good = json.dumps({"colour": "red", "n": 1})
    assert check_attributes_form(good) == good
    assert check_attributes_form(None) is None
    for text, message in (
        ('{"a": ' * 10_000 + "1" + "}" * 10_000, f"at most {MAX_JSON_DEPTH} levels"),
        (json.dumps({"a": "x" * MAX_ATTRIBUTES_JSON_CHARS}), str(MAX_ATTRIBUTES_JSON_CHARS)),
        ("[1]", "JSON object"),
        ("{", "not valid JSON"),
        ('{"a": "\\udfff"}', "surrogate"),
    ):
        problem = refused(check_attributes_form, text)
        assert problem.code == "invalid_attributes" and message in problem.detail
