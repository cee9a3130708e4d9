"""Keyword and hybrid search, the filter language, thumbnails and collections, through the
gateway with every service a real process."""

from __future__ import annotations

import io
from typing import Any

import httpx
from PIL import Image

from crossmodal.demo.shapes import render
from tests.integration.support import SHAPES_COLLECTION, add_item, assert_problem, png_bytes


def search(gateway: httpx.Client, auth: dict[str, str], **body: Any) -> dict[str, Any]:
    response = gateway.post(
        "/search/text", headers=auth, json={"collection": SHAPES_COLLECTION, **body}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_keyword_mode_matches_caption_words(
    gateway: httpx.Client, auth: dict[str, str], shapes: dict[str, dict[str, Any]]
) -> None:
    body = search(gateway, auth, query="purple", mode="keyword", top_k=10)
    assert body["model_id"] is None
    colours = {r["item"]["attributes"]["colour"] for r in body["results"]}
    assert colours == {"purple"}
    assert len(body["results"]) == 4  # the four purple shapes, nothing else
    body = search(gateway, auth, query="purple star", mode="keyword", target="text", top_k=3)
    assert body["results"][0]["item_id"] == shapes["a purple star"]["id"]
    assert "purple star" in body["results"][0]["caption"]["text"]


def test_hybrid_mode_fuses_both_rankings(
    gateway: httpx.Client, auth: dict[str, str], shapes: dict[str, dict[str, Any]]
) -> None:
    vector = search(gateway, auth, query="a green square", top_k=5)
    hybrid = search(gateway, auth, query="a green square", mode="hybrid", top_k=5)
    assert hybrid["model_id"] == vector["model_id"]
    assert hybrid["results"][0]["item_id"] == shapes["a green square"]["id"]
    # Fused scores are reciprocal-rank sums, not cosine similarities.
    assert hybrid["results"][0]["score"] < 0.05 < vector["results"][0]["score"]


def test_filter_language_reaches_the_search(
    gateway: httpx.Client, auth: dict[str, str], shapes: dict[str, dict[str, Any]]
) -> None:
    filters = {"$or": [{"shape": "star"}, {"colour": "red"}], "$not": {"colour": "black"}}
    body = search(gateway, auth, query="a red circle", top_k=20, filters=filters)
    got = {
        (r["item"]["attributes"]["colour"], r["item"]["attributes"]["shape"])
        for r in body["results"]
    }
    expected = {
        (c, s)
        for c, s in (d.split(" ", 2)[1:] for d in shapes)
        if (s == "star" or c == "red") and c != "black"
    }
    assert got == expected
    assert body["results"][0]["item_id"] == shapes["a red circle"]["id"]


def test_thumbnail_is_served_smaller(
    gateway: httpx.Client, auth: dict[str, str], shapes: dict[str, dict[str, Any]]
) -> None:
    item = shapes["a blue square"]
    original = gateway.get(f"/items/{item['id']}/image", headers=auth)
    thumb = gateway.get(f"/items/{item['id']}/image", headers=auth, params={"size": "thumb"})
    assert original.status_code == thumb.status_code == 200
    assert thumb.content != original.content
    assert thumb.headers["content-type"].startswith("image/")
    with Image.open(io.BytesIO(thumb.content)) as image:
        assert max(image.size) <= 256
    bad = gateway.get(f"/items/{item['id']}/image", headers=auth, params={"size": "huge"})
    assert_problem(bad, 422, "validation_error")


def test_collections_list_describe_and_delete(
    gateway: httpx.Client, auth: dict[str, str], shapes: dict[str, dict[str, Any]]
) -> None:
    listed = gateway.get("/collections", headers=auth).json()["collections"]
    assert SHAPES_COLLECTION in {c["name"] for c in listed}
    described = gateway.get(f"/collections/{SHAPES_COLLECTION}", headers=auth)
    assert described.status_code == 200, described.text

    collection = "doomed"
    item = add_item(
        gateway,
        auth,
        png_bytes(render("pink", "star")),
        collection=collection,
        captions=["a pink star"],
    )
    query = {"query": "a pink star", "collection": collection}
    found = gateway.post("/search/text", headers=auth, json=query).json()["results"]
    assert [r["item_id"] for r in found] == [item["id"]]
    hashes = gateway.post(
        f"/collections/{collection}/hashes",
        headers=auth,
        json={"sha256": [item["image_sha256"], "0" * 64]},
    )
    assert [m["id"] for m in hashes.json()["items"]] == [item["id"]]

    deleted = gateway.delete(f"/collections/{collection}", headers=auth)
    assert deleted.status_code == 202, deleted.text
    assert deleted.json()["items"] == 1
    assert deleted.headers["location"] == f"/deletions/{deleted.json()['id']}"
    assert_problem(
        gateway.get(f"/collections/{collection}", headers=auth), 404, "collection_not_found"
    )
    assert_problem(gateway.get(f"/items/{item['id']}", headers=auth), 404, "item_not_found")
    # Searching it is a 404 too, not an empty page.
    response = gateway.post("/search/text", headers=auth, json=query)
    assert_problem(response, 404, "collection_not_found")
