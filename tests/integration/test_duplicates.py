"""The duplicate policy end to end (docs/metadata.md, "Merging a duplicate into the item"): an
image already in the collection gains what a duplicate brings, through the API, with every
service a process (see conftest.py). Each test uses collections of its own."""

from __future__ import annotations

import random
from typing import Any

import httpx

from crossmodal.demo.shapes import render
from tests.integration.support import add_item, assert_problem, png_bytes


def search_captions(
    gateway: httpx.Client, auth: dict[str, str], query: str, collection: str
) -> list[str]:
    response = gateway.post(
        "/search/text",
        headers=auth,
        json={"query": query, "collection": collection, "target": "text", "top_k": 10},
    )
    assert response.status_code == 200, response.text
    return [hit["caption"]["text"] for hit in response.json()["results"]]


def test_a_duplicate_upload_merges_into_the_item(
    gateway: httpx.Client, auth: dict[str, str]
) -> None:
    collection = "dup-api"
    image = png_bytes(render("purple", "circle", rng=random.Random(11)))
    item = add_item(
        gateway, auth, image, collection=collection, captions=["a purple circle"],
        attributes={"colour": "purple"},
    )  # fmt: skip
    new_caption = "a drawing of a purple circle"
    # Searched (and cached) before the merge: the collection has one caption.
    assert search_captions(gateway, auth, new_caption, collection) == ["a purple circle"]

    response = gateway.post(
        "/items",
        headers=auth,
        data={"collection": collection, "caption": [new_caption]},
        files={"image": ("again.png", image, "image/png")},
    )
    duplicate = assert_problem(response, 409, "duplicate_item")
    assert duplicate["item_id"] == item["id"]

    response = gateway.post(
        f"/items/{duplicate['item_id']}/merge",
        headers=auth,
        json={
            "captions": [new_caption, "a purple circle"],
            "tags": ["shape"],
            "attributes": {"colour": "violet", "shape": "circle"},
        },
    )
    assert response.status_code == 200, response.text
    merged: dict[str, Any] = response.json()
    assert [c["text"] for c in merged["added_captions"]] == [new_caption]
    assert merged["added_tags"] == ["shape"] and merged["added_attributes"] == ["shape"]
    assert merged["conflicts"] == [{"key": "colour", "kept": "purple", "offered": "violet"}]
    assert merged["item"]["image_url"] == f"/items/{item['id']}/image"

    stored = gateway.get(f"/items/{item['id']}", headers=auth).json()
    assert [c["text"] for c in stored["captions"]] == ["a purple circle", new_caption]
    assert stored["attributes"] == {"colour": "purple", "shape": "circle"}
    assert stored["tags"] == ["shape"] and stored["status"] == "indexed"
    # The new caption has its vector (its own text is its nearest caption), and the page cached
    # before the merge is not served again.
    assert search_captions(gateway, auth, new_caption, collection)[0] == new_caption
    described = gateway.get(f"/collections/{collection}", headers=auth).json()
    assert described["items"] == 1 and described["captions"] == 2

    # The same merge again adds nothing.
    again = gateway.post(
        f"/items/{item['id']}/merge", headers=auth, json={"captions": [f" {new_caption} "]}
    )
    assert again.status_code == 200 and again.json()["added_captions"] == []
    assert len(gateway.get(f"/items/{item['id']}", headers=auth).json()["captions"]) == 2

    assert_problem(
        gateway.post("/items/987654321/merge", headers=auth, json={"captions": ["x"]}),
        404,
        "item_not_found",
    )
    assert_problem(
        gateway.post(f"/items/{item['id']}/merge", headers=auth, json={"captions": [" "]}),
        422,
        "validation_error",
    )
    assert_problem(
        gateway.post(
            f"/items/{item['id']}/merge", headers=auth, json={"attributes": {"a": {"b": 1}}}
        ),
        422,
        "invalid_attributes",
    )
