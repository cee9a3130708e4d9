"""Bad input gets a 4xx problem body with a stable code, never a 500."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from crossmodal.demo.shapes import render
from tests.integration.support import SHAPES_COLLECTION, assert_problem, png_bytes


def _search_image(
    gateway: httpx.Client, auth: dict[str, str], files: dict, **data: str
) -> httpx.Response:
    return gateway.post(
        "/search/image", headers=auth, data={"collection": SHAPES_COLLECTION, **data}, files=files
    )


def test_corrupt_image_is_422(gateway: httpx.Client, auth: dict[str, str], shapes: dict) -> None:
    corrupt = png_bytes(render("red", "circle"))[:200]
    response = _search_image(gateway, auth, {"image": ("x.png", corrupt, "image/png")})
    assert_problem(response, 422, "invalid_image")
    response = _search_image(
        gateway, auth, {"image": ("x.png", b"not an image at all", "image/png")}
    )
    assert_problem(response, 422, "invalid_image")


def test_corrupt_image_is_refused_on_upload_and_nothing_is_stored(
    gateway: httpx.Client, auth: dict[str, str]
) -> None:
    response = gateway.post(
        "/items",
        headers=auth,
        data={"collection": "never-created", "caption": ["x"]},
        files={"image": ("x.png", b"\x89PNG\r\n\x1a\n garbage", "image/png")},
    )
    assert_problem(response, 422, "invalid_image")
    search = {"query": "x", "collection": "never-created"}
    assert_problem(
        gateway.post("/search/text", headers=auth, json=search), 404, "collection_not_found"
    )


def test_wrong_upload_content_type_is_415(gateway: httpx.Client, auth: dict[str, str]) -> None:
    response = _search_image(gateway, auth, {"image": ("notes.txt", b"hello", "text/plain")})
    assert_problem(response, 415, "unsupported_media_type")


def test_json_body_with_wrong_content_type_is_4xx(
    gateway: httpx.Client, auth: dict[str, str]
) -> None:
    response = gateway.post(
        "/search/text",
        headers={**auth, "Content-Type": "text/plain"},
        content=b'{"query": "a red circle"}',
    )
    assert_problem(response, 422, "validation_error")
    response = gateway.post(
        "/search/text",
        headers=auth,
        content=b"{not json",
    )
    assert 400 <= response.status_code < 500


def test_missing_image_field_is_422(gateway: httpx.Client, auth: dict[str, str]) -> None:
    response = gateway.post("/search/image", headers=auth, data={"collection": SHAPES_COLLECTION})
    assert_problem(response, 422, "validation_error")


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_empty_query_is_422(gateway: httpx.Client, auth: dict[str, str], query: str) -> None:
    response = gateway.post(
        "/search/text", headers=auth, json={"query": query, "collection": SHAPES_COLLECTION}
    )
    assert_problem(response, 422, "validation_error")


@pytest.mark.parametrize("top_k", [0, -1, 101, "many"])
def test_top_k_out_of_range_is_422(
    gateway: httpx.Client, auth: dict[str, str], top_k: object
) -> None:
    body = {"query": "a red circle", "collection": SHAPES_COLLECTION, "top_k": top_k}
    assert_problem(gateway.post("/search/text", headers=auth, json=body), 422, "validation_error")
    image = png_bytes(render("red", "circle"))
    response = _search_image(
        gateway, auth, {"image": ("q.png", image, "image/png")}, top_k=str(top_k)
    )
    assert_problem(response, 422, "validation_error")


def test_unknown_collection_is_404(
    gateway: httpx.Client, auth: dict[str, str], shapes: dict
) -> None:
    body = {"query": "a red circle", "collection": "no-such-collection"}
    assert_problem(
        gateway.post("/search/text", headers=auth, json=body), 404, "collection_not_found"
    )


def test_invalid_collection_name_and_target_are_422(
    gateway: httpx.Client, auth: dict[str, str]
) -> None:
    for body in (
        {"query": "a red circle", "collection": "../etc"},
        {"query": "a red circle", "collection": SHAPES_COLLECTION, "target": "video"},
        {"query": "a red circle", "collection": SHAPES_COLLECTION, "unknown": 1},
    ):
        assert_problem(
            gateway.post("/search/text", headers=auth, json=body), 422, "validation_error"
        )


def test_invalid_filters_are_422(gateway: httpx.Client, auth: dict[str, str], shapes: dict) -> None:
    # The metadata service validates the filter language and points at the bad part.
    for filters, pointer in (
        ({"colour": {"$gt": "red"}}, "/filters/colour/$gt"),
        ({"$or": [{"shape": "circle"}, {"$bogus": 1}]}, "/filters/$or/1/$bogus"),
    ):
        body = {"query": "a red circle", "collection": SHAPES_COLLECTION, "filters": filters}
        response = gateway.post("/search/text", headers=auth, json=body)
        assert assert_problem(response, 422, "invalid_filter")["pointer"] == pointer
    body = {"query": "a red circle", "collection": SHAPES_COLLECTION, "filters": [1]}
    assert_problem(gateway.post("/search/text", headers=auth, json=body), 422, "validation_error")
    image = png_bytes(render("red", "circle"))
    for filters in ("{not json", "[1, 2]"):
        response = _search_image(
            gateway, auth, {"image": ("q.png", image, "image/png")}, filters=filters
        )
        assert_problem(response, 422, "invalid_filter")


def test_oversized_image_is_413(gateway: httpx.Client, auth: dict[str, str], shapes: dict) -> None:
    # 81 megapixels: small as a PNG, far above the feature service's pixel budget.
    buffer = io.BytesIO()
    Image.new("RGB", (9000, 9000), "white").save(buffer, format="PNG")
    response = _search_image(gateway, auth, {"image": ("big.png", buffer.getvalue(), "image/png")})
    assert_problem(response, 413, "image_too_large")


def test_unknown_route_is_a_problem(gateway: httpx.Client) -> None:
    assert_problem(gateway.get("/no/such/route"), 404, "not_found")
