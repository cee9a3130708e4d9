"""POST /collections/{collection}/hits writes its JSON from plain rows (no ORM objects, no
models): its answer must be the very bytes ``HitsOut`` would serialise, on both databases; and
the SQLite engine keeps a connection per worker thread rather than reopening them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import event, text

from services.metadata.db import SQLITE_POOL_SIZE, make_engine
from shared.contracts.metadata import CaptionOut, Hit, HitsOut, ItemOut
from tests.services.metadata.support import assert_problem, create, create_indexed


def _expected(client: TestClient, hits: list[tuple[int, dict[str, Any] | None, int]]) -> bytes:
    """``HitsOut`` built the model way, from GET /items/{id} (which goes through the ORM)."""
    return (
        HitsOut(
            hits=[
                Hit(
                    id=hit_id,
                    caption=None if caption is None else CaptionOut(**caption),
                    item=ItemOut.model_validate(client.get(f"/items/{item_id}").json()),
                )
                for hit_id, caption, item_id in hits
            ]
        )
        .model_dump_json()
        .encode()
    )


def test_hits_are_the_bytes_the_models_would_write(client: TestClient) -> None:
    full = create_indexed(
        client,
        captions=["zwei Wörter", 'café ☕ "quoted"', "third"],
        tags=["b", "a", "ünï"],
        attributes='{"n": 3, "x": 1.5, "ok": true, "none": null, "name": "é", "big": 12345678901}',
        source_uri="https://example.com/a.png",
    )
    bare = create_indexed(client)  # no captions, no tags, no attributes
    # Failed once, then indexed: attempts and model_id come back as they are stored.
    retried = create(client, captions=["retried"])
    failed = client.patch(
        f"/items/{retried['id']}", json={"status": "failed", "error": "decoder ✗"}
    )
    assert failed.status_code == 200, failed.text
    indexed = client.patch(
        f"/items/{retried['id']}", json={"status": "indexed", "model_id": "model-a"}
    )
    assert indexed.status_code == 200, indexed.text
    assert indexed.json()["attempts"] == 1
    assert indexed.json()["indexed_at"] is not None

    ids = [retried["id"], full["id"], bare["id"]]
    images = client.post("/collections/photos/hits", json={"target": "image", "ids": ids})
    assert images.status_code == 200
    assert images.headers["content-type"] == "application/json"
    assert images.content == _expected(client, [(i, None, i) for i in ids])
    item = images.json()["hits"][1]["item"]
    assert [c["text"] for c in item["captions"]] == ["zwei Wörter", 'café ☕ "quoted"', "third"]
    assert item["tags"] == ["b", "a", "ünï"]

    second, first = full["captions"][1], full["captions"][0]
    caption_ids = [second["id"], retried["captions"][0]["id"], first["id"]]
    texts = client.post("/collections/photos/hits", json={"target": "text", "ids": caption_ids})
    assert texts.status_code == 200
    assert texts.content == _expected(
        client,
        [
            (second["id"], second, full["id"]),
            (retried["captions"][0]["id"], retried["captions"][0], retried["id"]),
            (first["id"], first, full["id"]),
        ],
    )


def test_hits_leave_out_what_a_search_must_not_show(client: TestClient) -> None:
    shown = create_indexed(client, captions=["shown"])
    pending = create(client, captions=["pending"])
    failed = create(client, captions=["failed"])
    client.patch(f"/items/{failed['id']}", json={"status": "failed", "error": "x"})
    elsewhere = create_indexed(client, collection="other", captions=["elsewhere"])
    gone = create_indexed(client, captions=["gone"])
    assert client.delete(f"/items/{gone['id']}").status_code == 204

    ids = [i["id"] for i in (pending, failed, elsewhere, gone, shown)] + [2**63 - 1, -5]
    images = client.post("/collections/photos/hits", json={"target": "image", "ids": ids})
    assert [h["id"] for h in images.json()["hits"]] == [shown["id"]]
    caption_ids = [i["captions"][0]["id"] for i in (pending, failed, elsewhere, gone, shown)]
    texts = client.post(
        "/collections/photos/hits", json={"target": "text", "ids": [*caption_ids, 2**70]}
    )
    assert [h["id"] for h in texts.json()["hits"]] == [shown["captions"][0]["id"]]
    # Nothing found, and nothing asked: the same empty answer.
    for target in ("image", "text"):
        for asked in ([], [pending["id"], 2**70]):
            response = client.post(
                "/collections/photos/hits", json={"target": target, "ids": asked}
            )
            assert response.status_code == 200
            assert response.json() == {"hits": []}
    # A collection that does not exist (or is being deleted) is not an empty one.
    missing = client.post("/collections/nowhere/hits", json={"target": "image", "ids": ids})
    assert_problem(missing, 404, "collection_not_found")


def test_sqlite_keeps_a_connection_per_worker_thread(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'metadata.db'}")
    opened: list[object] = []
    event.listen(engine, "connect", lambda connection, _record: opened.append(connection))
    concurrent = 8  # the gateway's searches in flight in the end-to-end benchmark
    assert concurrent <= SQLITE_POOL_SIZE
    barrier = threading.Barrier(concurrent)

    def query() -> None:
        with engine.connect() as connection:
            barrier.wait()  # every thread holds a connection at once
            connection.execute(text("SELECT 1"))

    try:
        for _ in range(3):
            threads = [threading.Thread(target=query) for _ in range(concurrent)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        # Opened once by the first round, reused by the next ones: never reopened.
        assert len(opened) == concurrent
    finally:
        engine.dispose()
