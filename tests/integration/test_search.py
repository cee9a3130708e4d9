"""Search end to end through the gateway, with every service a real process.

The tiny CLIP behind these tests was trained for seconds on the shapes; each ranking assertion
fails on a random-weights model (see tests/crossmodal for the alignment check itself).
"""

from __future__ import annotations

import random
import re
from typing import Any

import httpx
import pytest

from crossmodal.demo.shapes import demo_collection, render
from crossmodal.stack import LocalStack
from tests.integration.support import SHAPES_COLLECTION, add_item, assert_problem, png_bytes

SAMPLE_CAPTIONS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a black star",
    "a yellow circle",
    "a pink square",
]


def search_text(
    gateway: httpx.Client, auth: dict[str, str], query: str, **fields: Any
) -> httpx.Response:
    body = {"query": query, "collection": SHAPES_COLLECTION, **fields}
    return gateway.post("/search/text", headers=auth, json=body)


def search_image(
    gateway: httpx.Client, auth: dict[str, str], image: bytes, **fields: Any
) -> httpx.Response:
    data = {"collection": SHAPES_COLLECTION, **{k: str(v) for k, v in fields.items()}}
    return gateway.post(
        "/search/image", headers=auth, data=data, files={"image": ("q.png", image, "image/png")}
    )


def canonical_png(caption: str) -> bytes:
    demo = next(d for d in demo_collection() if d.caption == caption)
    return png_bytes(demo.image)


@pytest.mark.parametrize("caption", SAMPLE_CAPTIONS)
def test_text_to_image_ranks_the_expected_item_first(
    gateway: httpx.Client, auth: dict[str, str], shapes: dict[str, dict[str, Any]], caption: str
) -> None:
    response = search_text(gateway, auth, caption, target="image", top_k=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    assert body["results"][0]["item_id"] == shapes[caption]["id"]
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("caption", SAMPLE_CAPTIONS)
def test_image_to_text_returns_the_expected_caption(
    gateway: httpx.Client, auth: dict[str, str], shapes: dict[str, dict[str, Any]], caption: str
) -> None:
    response = search_image(gateway, auth, canonical_png(caption), target="text", top_k=3)
    assert response.status_code == 200, response.text
    best = response.json()["results"][0]
    assert best["item_id"] == shapes[caption]["id"]
    # Each image has two captions ("a red circle", "a photo of a red circle"): either is right.
    assert caption.removeprefix("a ") in best["caption"]["text"]


def test_image_to_image_finds_the_same_image_first(
    gateway: httpx.Client, auth: dict[str, str], shapes: dict[str, dict[str, Any]]
) -> None:
    for caption in SAMPLE_CAPTIONS:
        response = search_image(gateway, auth, canonical_png(caption), target="image", top_k=3)
        best = response.json()["results"][0]
        assert best["item_id"] == shapes[caption]["id"]
        assert best["score"] > 0.999


def test_filters_restrict_results_and_still_fill_top_k(
    gateway: httpx.Client, auth: dict[str, str], shapes: dict[str, dict[str, Any]]
) -> None:
    response = search_text(
        gateway, auth, "a red circle", target="image", top_k=5, filters={"shape": "square"}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 5
    assert all(r["item"]["attributes"]["shape"] == "square" for r in results)
    assert results[0]["item_id"] == shapes["a red square"]["id"]
    response = search_text(
        gateway, auth, "a red circle", target="text", top_k=4, filters={"colour": ["blue", "green"]}
    )
    results = response.json()["results"]
    assert len(results) == 4
    assert all(r["item"]["attributes"]["colour"] in ("blue", "green") for r in results)


def _metric(gateway: httpx.Client, name: str, labels: str) -> float:
    text = gateway.get("/metrics").text
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_repeated_search_is_answered_from_the_cache(
    gateway: httpx.Client, auth: dict[str, str], shapes: dict[str, dict[str, Any]]
) -> None:
    hits_before = _metric(gateway, "gateway_cache_requests_total", 'result="hit"')
    first = search_text(gateway, auth, "a purple star", target="image", top_k=7)
    second = search_text(gateway, auth, "a  purple star ", target="image", top_k=7)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-cache"] == "miss"
    assert second.headers["x-cache"] == "hit"
    assert second.json() == first.json()
    assert _metric(gateway, "gateway_cache_requests_total", 'result="hit"') == hits_before + 1
    # A different top_k is a different page, not a cache hit.
    third = search_text(gateway, auth, "a purple star", target="image", top_k=6)
    assert third.headers["x-cache"] == "miss"
    assert len(third.json()["results"]) == 6


def test_added_item_is_found_and_deleted_item_is_not(
    gateway: httpx.Client, auth: dict[str, str]
) -> None:
    collection = "scratch"
    query = {"query": "an orange triangle", "collection": collection, "target": "image"}
    assert_problem(
        gateway.post("/search/text", headers=auth, json=query), 404, "collection_not_found"
    )

    first_png = png_bytes(render("orange", "triangle", rng=random.Random(1)))
    first = add_item(
        gateway, auth, first_png, collection=collection, captions=["an orange triangle"]
    )
    response = gateway.post("/search/text", headers=auth, json=query)
    assert [r["item_id"] for r in response.json()["results"]] == [first["id"]]

    # The page above is cached now; a write must make it unreachable at once.
    second_png = png_bytes(render("orange", "triangle", rng=random.Random(2)))
    second = add_item(
        gateway, auth, second_png, collection=collection, captions=["an orange triangle"]
    )
    response = gateway.post("/search/text", headers=auth, json=query)
    assert response.headers["x-cache"] == "miss"
    assert {r["item_id"] for r in response.json()["results"]} == {first["id"], second["id"]}

    fetched = gateway.get(f"/items/{second['id']}", headers=auth)
    assert fetched.json()["captions"][0]["text"] == "an orange triangle"
    image = gateway.get(f"/items/{second['id']}/image", headers=auth)
    assert image.content == second_png and image.headers["content-type"] == "image/png"

    assert gateway.delete(f"/items/{first['id']}", headers=auth).status_code == 204
    response = gateway.post("/search/text", headers=auth, json=query)
    assert [r["item_id"] for r in response.json()["results"]] == [second["id"]]
    text_query = {**query, "target": "text"}
    response = gateway.post("/search/text", headers=auth, json=text_query)
    assert [r["item_id"] for r in response.json()["results"]] == [second["id"]]
    assert_problem(gateway.get(f"/items/{first['id']}", headers=auth), 404, "item_not_found")
    assert_problem(gateway.delete(f"/items/{first['id']}", headers=auth), 404, "item_not_found")


def test_restarting_retrieval_and_metadata_loses_no_item(
    stack: LocalStack,
    gateway: httpx.Client,
    auth: dict[str, str],
    shapes: dict[str, dict[str, Any]],
) -> None:
    # Runs last in this module: it restarts services under the shared stack.
    before = {
        caption: search_text(gateway, auth, caption, target="image", top_k=3).json()["results"]
        for caption in SAMPLE_CAPTIONS
    }
    stack.restart("retrieval", kill=True)  # no graceful snapshot: the write-ahead log must carry it
    stack.restart("metadata")
    for item in shapes.values():
        response = gateway.get(f"/items/{item['id']}", headers=auth)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "indexed"
    for caption in SAMPLE_CAPTIONS:
        # top_k=4 bypasses the cached top_k=3 pages: these answers come from the restarted services.
        response = search_text(gateway, auth, caption, target="image", top_k=4)
        assert response.headers["x-cache"] == "miss"
        results = response.json()["results"]
        assert [r["item_id"] for r in results[:3]] == [r["item_id"] for r in before[caption]]
        response = search_image(gateway, auth, canonical_png(caption), target="image", top_k=1)
        assert response.json()["results"][0]["item_id"] == shapes[caption]["id"]
