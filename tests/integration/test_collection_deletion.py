"""Deleting a collection, against real processes: it is gone from every answer at once, its
vectors, items, captions and images are removed in the background, a collection of the same
name made right after starts empty, and a deletion survives a kill -9 of the gateway, the
metadata or the retrieval service in its middle, leaving nothing behind."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from crossmodal.demo.shapes import render
from crossmodal.stack import LocalStack
from services.metadata.db import make_engine
from services.metadata.images import ImageStore
from services.metadata.models import Caption, Collection, Item
from tests.integration.support import (
    add_item,
    assert_problem,
    bearer,
    gateway_client,
    png_bytes,
    running_stack,
)

SEEDED = 2000  # items of the collection deleted under each kill


def follow(gateway: httpx.Client, auth: dict[str, str], deletion_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        response = gateway.get(f"/deletions/{deletion_id}", headers=auth)
        if response.status_code == 200 and response.json()["state"] == "done":
            return response.json()  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, response.text
        time.sleep(0.2)


def test_a_deleted_collection_is_gone_at_once_and_its_name_starts_empty(
    stack: LocalStack, gateway: httpx.Client, auth: dict[str, str]
) -> None:
    collection = "deleted-then-made-again"
    shapes = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("black", "star")]
    old = [
        add_item(
            gateway, auth, png_bytes(render(c, s)), collection=collection, captions=[f"a {c} {s}"]
        )
        for c, s in shapes
    ]
    query = {"query": "a red circle", "collection": collection, "top_k": 10}
    assert len(gateway.post("/search/text", headers=auth, json=query).json()["results"]) == 4

    response = gateway.delete(f"/collections/{collection}", headers=auth)
    assert response.status_code == 202, response.text
    deletion = response.json()
    assert (deletion["collection"], deletion["items"]) == (collection, 4)
    # Gone from every answer at once.
    assert_problem(
        gateway.get(f"/collections/{collection}", headers=auth), 404, "collection_not_found"
    )
    assert_problem(
        gateway.post("/search/text", headers=auth, json=query), 404, "collection_not_found"
    )
    assert_problem(gateway.get(f"/items/{old[0]['id']}", headers=auth), 404, "item_not_found")
    listed = gateway.get("/collections", headers=auth).json()["collections"]
    assert collection not in [c["name"] for c in listed]
    assert follow(gateway, auth, deletion["id"])["items_left"] == 0

    # The same name right away: a collection that starts empty, with none of the old vectors.
    new = [
        add_item(
            gateway,
            auth,
            png_bytes(render(c, s)),
            collection=collection,
            captions=[f"{c} {s} again"],
        )
        for c, s in shapes[:2]
    ]
    results = gateway.post("/search/text", headers=auth, json=query).json()["results"]
    assert sorted(r["item_id"] for r in results) == sorted(item["id"] for item in new)
    vectors = httpx.get(
        f"{stack.url('retrieval')}/collections/{collection}",
        headers=stack.service_headers("retrieval"),
        timeout=10,
    ).json()
    assert vectors["counts"] == {"image": 2, "text": 2}


# --- kill -9 in the middle of a deletion ----------------------------------------------------------


@pytest.fixture(scope="module")
def kill_stack(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with running_stack(
        tmp_path_factory.mktemp("deletion-stack"),
        demo_model_dir,
        extra_env={
            # Small batches: a purge of the seeded items takes many transactions to cut into.
            "METADATA_PURGE_BATCH": "50",
            "METADATA_PURGE_POLL_SECONDS": "1",
            "GATEWAY_MAINTENANCE_INTERVAL_SECONDS": "1",
        },
    ) as stack:
        yield stack


def _tiny_png(n: int) -> bytes:
    # Distinct bytes per item (the same image twice in a collection is one item).
    pixels = np.array([[[n % 256, n // 256 % 256, 7]]], dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels))


def seed(stack: LocalStack, collection: str, count: int) -> list[str]:
    """``count`` indexed items with a caption each, their image files and their vectors: rows
    and files written in one transaction beside the running metadata service (its SQLite file
    in WAL mode takes a second writer; through its API, two commits an item, this would take
    most of a minute), vectors through retrieval's API. The image hashes."""
    images = ImageStore(stack.data_dir / "metadata" / "images")
    engine = make_engine(f"sqlite:///{stack.data_dir / 'metadata' / 'metadata.db'}")
    hashes = []
    try:
        with Session(engine) as session, session.begin():
            session.add(Collection(name=collection, model_id="seeded-model", index_settings={}))
            for n in range(count):
                data = _tiny_png(n)
                sha256 = hashlib.sha256(data).hexdigest()
                images.put(sha256, data)
                hashes.append(sha256)
                text = f"seeded item {n}"
                session.add(
                    Item(
                        collection=collection,
                        status="indexed",
                        image_sha256=sha256,
                        content_type="image/png",
                        attributes={},
                        model_id="seeded-model",
                        search_text=text,
                        captions=[Caption(position=0, text=text)],
                    )
                )
            session.flush()
            rows = session.execute(
                select(Item.id, Caption.id)
                .join(Caption, Caption.item_id == Item.id)
                .where(Item.collection == collection)
            ).all()
    finally:
        engine.dispose()
    retrieval = httpx.Client(
        base_url=stack.url("retrieval"), headers=stack.service_headers("retrieval"), timeout=30
    )
    rng = np.random.default_rng(0)
    with retrieval:
        for modality, column in (("image", 0), ("text", 1)):
            ids = [row[column] for row in rows]
            for start in range(0, len(ids), 1000):
                chunk = ids[start : start + 1000]
                upserted = retrieval.post(
                    f"/collections/{collection}/upsert",
                    json={
                        "modality": modality,
                        "model_id": "seeded-model",
                        "ids": chunk,
                        "vectors": rng.standard_normal((len(chunk), 32)).tolist(),
                    },
                )
                assert upserted.status_code == 200, upserted.text
    return hashes


def left_behind(stack: LocalStack, collection: str, hashes: list[str]) -> dict[str, Any]:
    """What the deleted collection still has anywhere: rows, files, vectors."""
    with sqlite3.connect(stack.data_dir / "metadata" / "metadata.db") as db:
        rows = {
            table: db.execute(query, (collection,)).fetchone()[0]
            for table, query in {
                "collections": "SELECT count(*) FROM collections WHERE name = ?",
                "items": "SELECT count(*) FROM items WHERE collection = ?",
                "captions": "SELECT count(*) FROM captions JOIN items ON items.id = "
                "captions.item_id WHERE items.collection = ?",
            }.items()
        }
    images = stack.data_dir / "metadata" / "images"
    files = sum(
        1
        for path in images.rglob("*")
        if path.is_file() and path.name.split("-")[0].split(".")[0] in set(hashes)
    )
    vectors = httpx.get(
        f"{stack.url('retrieval')}/collections/{collection}",
        headers=stack.service_headers("retrieval"),
        timeout=10,
    )
    return {**rows, "image files": files, "retrieval": vectors.status_code}


NOTHING = {"collections": 0, "items": 0, "captions": 0, "image files": 0, "retrieval": 404}


@pytest.mark.parametrize("victim", ["gateway", "metadata", "retrieval"])
def test_a_deletion_survives_a_kill_of_any_service_in_its_middle(
    kill_stack: LocalStack, victim: str
) -> None:
    collection = f"killed-{victim}"
    hashes = seed(kill_stack, collection, SEEDED)
    assert left_behind(kill_stack, collection, hashes)["items"] == SEEDED
    with gateway_client(kill_stack) as gateway:
        auth = bearer(gateway)
        answer: dict[str, Any] = {}

        def delete() -> None:
            try:
                answer["response"] = gateway.delete(f"/collections/{collection}", headers=auth)
            except httpx.HTTPError as exc:  # the gateway killed under it
                answer["error"] = exc

        request = threading.Thread(target=delete)
        request.start()
        time.sleep(0.05)  # the deletion under way: dropping vectors, or purging rows
        kill_stack.services[victim].stop(kill=True)
        request.join(30)
        kill_stack.restart(victim)

    with gateway_client(kill_stack) as gateway:
        auth = bearer(gateway)
        response = answer.get("response")
        if response is None or response.status_code != 202:
            # No answer (the gateway died, or one it called): a client sends it again.
            response = gateway.delete(f"/collections/{collection}", headers=auth)
            assert response.status_code in (202, 404), response.text
        if response.status_code == 202:
            follow(gateway, auth, response.json()["id"])
        assert_problem(
            gateway.get(f"/collections/{collection}", headers=auth), 404, "collection_not_found"
        )
    assert left_behind(kill_stack, collection, hashes) == NOTHING
