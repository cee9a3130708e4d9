"""The demo collection that `make run` indexes, through the same launcher code."""

from __future__ import annotations

from pathlib import Path

import httpx

from crossmodal.cli import DEMO_COLLECTION, seed_demo_collection
from crossmodal.stack import LocalStack


def test_demo_collection_is_indexed_once_and_searchable(
    stack: LocalStack, gateway: httpx.Client, auth: dict[str, str], tmp_path: Path
) -> None:
    assert seed_demo_collection(stack, tmp_path / "collection") == 32
    assert seed_demo_collection(stack, tmp_path / "collection") == 0  # a second start adds nothing
    assert (tmp_path / "collection" / "blue-square.png").is_file()

    response = gateway.post(
        "/search/text",
        headers=auth,
        json={"query": "a red circle", "top_k": 32, "collection": DEMO_COLLECTION},
    )
    results = response.json()["results"]
    assert len(results) == 32
    assert results[0]["item"]["attributes"] == {"colour": "red", "shape": "circle"}
