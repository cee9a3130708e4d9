"""The demo `make run` serves: the emoji demo model and its collection, seeded through the same
launcher code (`crossmodal.cli.seed_demo_collection`) into a stack of its own.

A tenth of the 1,914 emoji (plus the README's examples) keeps the seeding to seconds; the
shipped model's recall over the whole collection is measured in tests/crossmodal/test_emoji.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crossmodal.cli import DEMO_COLLECTION, seed_demo_collection
from crossmodal.demo.emoji import Emoji, demo_set, render
from crossmodal.stack import LocalStack
from tests.integration.support import (
    bearer,
    delete_collection,
    gateway_client,
    png_bytes,
    running_stack,
)

EXAMPLES = {"pizza": "🍕", "crying face": "😢", "red heart": "❤️"}


def _subset() -> list[Emoji]:
    return [e for i, e in enumerate(demo_set()) if i % 10 == 0 or e.char in EXAMPLES.values()]


@pytest.fixture(scope="module")
def emoji_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    from crossmodal.demo import ensure_emoji_model

    root = tmp_path_factory.mktemp("emoji-stack")
    with running_stack(root / "stack", ensure_emoji_model(root / "model")) as stack:
        yield stack


@pytest.fixture(scope="module")
def emoji_gateway(emoji_stack: LocalStack) -> Iterator[httpx.Client]:
    with gateway_client(emoji_stack) as client:
        yield client


@pytest.fixture(scope="module")
def emoji_auth(emoji_gateway: httpx.Client) -> dict[str, str]:
    return bearer(emoji_gateway)


def test_demo_is_indexed_once_and_answers_the_readme_queries(
    emoji_stack: LocalStack,
    emoji_gateway: httpx.Client,
    emoji_auth: dict[str, str],
    tmp_path: Path,
) -> None:
    subset = _subset()
    assert seed_demo_collection(emoji_stack, tmp_path, subset, quiet=True) == len(subset)
    # A second start adds nothing (and re-renders nothing: the images are kept).
    assert seed_demo_collection(emoji_stack, tmp_path, subset, quiet=True) == 0
    assert (tmp_path / "1f355.png").is_file()

    for query, char in EXAMPLES.items():
        # No collection named: "demo" is the default, as in the banner's curl command.
        response = emoji_gateway.post(
            "/search/text", headers=emoji_auth, json={"query": query, "top_k": 3}
        )
        assert response.status_code == 200, response.text
        best = response.json()["results"][0]["item"]
        assert best["attributes"]["emoji"] == char, (query, best)
        assert [c["text"] for c in best["captions"]] == [query]

        response = emoji_gateway.post(
            "/search/image",
            headers=emoji_auth,
            data={"target": "text", "top_k": "3"},
            files={"image": ("q.png", png_bytes(render(char)), "image/png")},
        )
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["caption"]["text"] == query


def test_a_demo_collection_of_another_model_is_indexed_again(
    emoji_stack: LocalStack,
    emoji_gateway: httpx.Client,
    emoji_auth: dict[str, str],
    tmp_path: Path,
) -> None:
    # What an older `var/` holds after the demo model changed: the collection claimed by
    # another model, whose vectors this one cannot search.
    delete_collection(emoji_gateway, emoji_auth, DEMO_COLLECTION)
    created = emoji_gateway.post(
        "/collections",
        headers=emoji_auth,
        json={"name": DEMO_COLLECTION, "model_id": "an-older-demo-model"},
    )
    assert created.status_code == 201, created.text

    # The examples, and two flags OpenMoji draws alike: one item with both names.
    few = [e for e in demo_set() if e.char in {*EXAMPLES.values(), "🇫🇷", "🇲🇫"}]
    assert len(few) == 5
    assert seed_demo_collection(emoji_stack, tmp_path, few, quiet=True) == 4
    described = emoji_gateway.get(f"/collections/{DEMO_COLLECTION}", headers=emoji_auth).json()
    model_id = httpx.get(
        f"{emoji_stack.url('feature')}/model",
        headers=emoji_stack.service_headers("feature"),
        timeout=10,
    ).json()["model_id"]
    assert described["model_id"] == model_id
    assert described["items"] == 4
    assert seed_demo_collection(emoji_stack, tmp_path, few, quiet=True) == 0

    response = emoji_gateway.post(
        "/search/text", headers=emoji_auth, json={"query": "flag: St. Martin", "top_k": 1}
    )
    flag = response.json()["results"][0]["item"]
    captions = [c["text"] for c in flag["captions"]]
    assert sorted(captions) == ["flag: France", "flag: St. Martin"]

    # A start stopped after every image was indexed but before St. Martin's name was merged
    # into the flag's item: the next start finds a caption missing and merges it.
    st_martin = next(c["id"] for c in flag["captions"] if c["text"] == "flag: St. Martin")
    httpx.post(
        f"{emoji_stack.url('metadata')}/items/{flag['id']}/captions/delete",
        json={"ids": [st_martin]},
        headers=emoji_stack.service_headers("metadata"),
        timeout=10,
    ).raise_for_status()
    assert seed_demo_collection(emoji_stack, tmp_path, few, quiet=True) == 0
    stored = emoji_gateway.get(f"/items/{flag['id']}", headers=emoji_auth).json()
    assert sorted(c["text"] for c in stored["captions"]) == ["flag: France", "flag: St. Martin"]
