"""The duplicate policy end to end (docs/metadata.md, "Merging a duplicate into the item"): an
image already in the collection gains what a duplicate brings, through the API and through
``crossmodal index``, with every service a process (see conftest.py). Each test uses
collections of its own."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import httpx
import pytest

from crossmodal.demo.shapes import render
from crossmodal.stack import LocalStack
from tests.integration.support import add_item, assert_problem, png_bytes
from tests.integration.test_ingest_cli import crossmodal, login


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROSSMODAL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("CROSSMODAL_TOKEN", raising=False)


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


def test_index_keeps_every_caption_of_identical_images_and_repeated_paths(
    stack: LocalStack,
    cli_env: None,
    gateway: httpx.Client,
    auth: dict[str, str],
    tmp_path: Path,
) -> None:
    collection = "dup-cli"
    flag = png_bytes(render("blue", "square", rng=random.Random(21)))
    stamp = png_bytes(render("green", "star", rng=random.Random(22)))
    (tmp_path / "flags").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("fr", "mf", "cp"):  # three flags drawn alike
        (tmp_path / "flags" / f"{name}.png").write_bytes(flag)
    (tmp_path / "a" / "stamp.png").write_bytes(stamp)  # the same stamp in two folders
    (tmp_path / "b" / "stamp.png").write_bytes(stamp)
    (tmp_path / "circle.png").write_bytes(png_bytes(render("red", "circle", rng=random.Random(23))))
    (tmp_path / "other.png").write_bytes(
        png_bytes(render("black", "triangle", rng=random.Random(24)))
    )
    records = [
        {"image": "flags/fr.png", "caption": "flag: France", "attributes": {"emoji": "FR"}},
        {"image": "circle.png", "caption": "a red circle"},
        {"image": "flags/mf.png", "caption": "flag: St. Martin", "attributes": {"emoji": "MF"}},
        {"image": "a/stamp.png", "caption": "a green stamp", "tags": ["stamp"]},
        {"image": "flags/cp.png", "caption": "flag: Clipperton", "attributes": {"emoji": "CP"}},
        {"image": "other.png", "caption": "a black triangle"},
        {"image": "b/stamp.png", "caption": "a star on a stamp", "tags": ["used"]},
        {"image": "circle.png", "caption": "a round red shape"},  # the same path again
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    journal = tmp_path / "journal.jsonl"
    login(stack)
    index = ["index", str(manifest), "-c", collection, "--gateway", stack.url("gateway")]
    index += ["--journal", str(journal), "--batch-size", "3", "--concurrency", "2"]

    result = crossmodal(*index)
    assert result.exit_code == 0, result.output
    assert "4 indexed, 4 merged, 0 already there, 0 failed" in result.output
    assert "(8 in the input)" in result.output
    assert "emoji: kept 'FR', not 'MF'" in result.output

    # Every record's captions are on the item the journal names for it, through the API.
    entries = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    item_of = {entry["key"]: entry["item_id"] for entry in entries}
    assert len(item_of) == 8 and {e["outcome"] for e in entries} == {"indexed", "merged"}
    captions_of: dict[int, list[str]] = {}
    for item_id in set(item_of.values()):
        item = gateway.get(f"/items/{item_id}", headers=auth).json()
        assert item["status"] == "indexed"
        captions_of[item_id] = [c["text"] for c in item["captions"]]
    assert len(captions_of) == 4
    by_record: dict[str, int] = {}
    for record in records:
        # A source listed again has a key of its own in the journal (source#repeat-…).
        source = str((tmp_path / record["image"]).resolve())
        items = {i for k, i in item_of.items() if k == source or k.startswith(f"{source}#")}
        assert len(items) == 1, record
        (item_id,) = items
        assert record["caption"] in captions_of[item_id], (record, captions_of[item_id])
        by_record[record["caption"]] = item_id
    assert len(set(by_record.values())) == 4
    flag_item = by_record["flag: France"]
    assert captions_of[flag_item] == ["flag: France", "flag: St. Martin", "flag: Clipperton"]
    assert by_record["flag: St. Martin"] == by_record["flag: Clipperton"] == flag_item
    assert by_record["a green stamp"] == by_record["a star on a stamp"]
    assert captions_of[by_record["a red circle"]] == ["a red circle", "a round red shape"]
    stored = gateway.get(f"/items/{by_record['a green stamp']}", headers=auth).json()
    assert stored["tags"] == ["stamp", "used"]
    assert gateway.get(f"/items/{flag_item}", headers=auth).json()["attributes"] == {"emoji": "FR"}

    # A merged caption is searchable by its vector like any other.
    assert search_captions(gateway, auth, "flag: Clipperton", collection)[0] == "flag: Clipperton"

    # Again from scratch (no journal): nothing new, nothing lost, nothing stored twice.
    result = crossmodal(*index, "--restart")
    assert result.exit_code == 0, result.output
    assert "0 indexed, 0 merged, 8 already there, 0 failed" in result.output
    described = gateway.get(f"/collections/{collection}", headers=auth).json()
    assert described["items"] == 4 and described["captions"] == 8
