"""Reconcile: the id comparison and its repairs (pure), and the item-level check and repair over
HTTP against the real retrieval app, with metadata and feature as in-memory doubles that speak
their documented endpoints."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from crossmodal import reconcile as reconcile_module
from services.auth.app import create_app as create_auth_app
from services.retrieval.app import create_app
from services.retrieval.settings import RetrievalSettings
from shared.contracts.feature import (
    FeatureClient,
    ImageEmbeddings,
    TextEmbeddingRequest,
    TextEmbeddings,
)
from shared.contracts.metadata import (
    CaptionOut,
    ItemOut,
    ItemState,
    ItemStatesOut,
    MetadataClient,
    StatusUpdate,
)
from shared.contracts.retrieval import RetrievalClient
from shared.http import ServiceClient
from shared.reconcile import MetadataIds, Reconciler, diff, reconcile
from tests.lent import Lent
from tests.service_tokens import KEYS, auth_settings, service_headers

DIM = 8
MODEL = "clip-test"


def drift_gauge(collection: str, modality: str, side: str) -> float | None:
    return REGISTRY.get_sample_value(
        "crossmodal_reconcile_drift", {"collection": collection, "modality": modality, "side": side}
    )


# -- the comparison ------------------------------------------------------------------------------


def test_diff_sides_and_tolerated_ids() -> None:
    metadata = MetadataIds(expected=frozenset({1, 2, 3}), tolerated=frozenset({7}))
    assert diff({2, 3, 4, 7}, metadata) == ([4], [1])
    assert diff({2, 3, 4}, {1, 2}) == ([3, 4], [1])  # a plain set: all expected
    assert diff(set(), set()) == ([], [])


def test_reconcile_reports_repairs_and_sets_the_metric() -> None:
    calls: list[tuple[str, str, str, list[int] | None]] = []
    vectors = {"image": {1, 2, 5, 9}, "text": {10, 11}}
    wanted = {
        "image": MetadataIds(frozenset({1, 2, 3}), frozenset({9})),
        "text": MetadataIds(frozenset({10, 11})),
    }

    def retrieval_ids(collection: str, modality: str) -> set[int]:
        calls.append(("list-retrieval", collection, modality, None))
        return vectors[modality]

    def metadata_ids(collection: str, modality: str) -> MetadataIds:
        calls.append(("list-metadata", collection, modality, None))
        return wanted[modality]

    def delete(collection: str, modality: str, ids: list[int]) -> int:
        calls.append(("delete", collection, modality, ids))
        return len(ids)

    def requeue(collection: str, modality: str, ids: list[int]) -> int:
        calls.append(("requeue", collection, modality, ids))
        return len(ids)

    found = reconcile(
        "pure", retrieval_ids=retrieval_ids, metadata_ids=metadata_ids, delete_vectors=delete
    )
    assert [(d.modality, d.retrieval_only, d.metadata_only) for d in found] == [
        ("image", [5], [3]),
        ("text", [], []),
    ]
    assert not [c for c in calls if c[0] in ("delete", "requeue")]  # no repair asked
    # Retrieval is listed before metadata, for each modality (what makes deleting safe).
    listings = [c[0] for c in calls]
    assert listings == ["list-retrieval", "list-metadata"] * 2
    assert drift_gauge("pure", "image", "retrieval_only") == 1
    assert drift_gauge("pure", "image", "metadata_only") == 1

    calls.clear()
    repaired = reconcile(
        "pure",
        retrieval_ids=retrieval_ids,
        metadata_ids=metadata_ids,
        delete_vectors=delete,
        requeue=requeue,
        repair=True,
    )
    assert ("delete", "pure", "image", [5]) in calls
    assert ("requeue", "pure", "image", [3]) in calls
    assert repaired[0].deleted == 1 and repaired[0].requeued == 1 and repaired[0].remaining == 0
    assert drift_gauge("pure", "image", "retrieval_only") == 0
    assert drift_gauge("pure", "image", "metadata_only") == 0


def test_reconcile_without_a_repair_for_one_side_only_reports_it() -> None:
    found = reconcile(
        "half",
        retrieval_ids=lambda c, m: {1, 2},
        metadata_ids=lambda c, m: {2, 3},
        delete_vectors=lambda c, m, ids: len(ids),
        repair=True,
        modalities=("image",),
    )
    assert found[0].deleted == 1 and found[0].requeued == 0 and found[0].remaining == 1
    assert drift_gauge("half", "image", "metadata_only") == 1


# -- over HTTP -----------------------------------------------------------------------------------


class FakeMetadata:
    """Items with status, captions and images, behind the metadata endpoints reconcile uses."""

    def __init__(self, page_size: int = 2) -> None:
        self.items: dict[int, dict[str, Any]] = {}
        self.captions: dict[int, str] = {}
        self.page_size = page_size
        self.pages = 0

    def add(self, item_id: int, status: str, captions: dict[int, str], age: float = 3600) -> None:
        updated = datetime.now(UTC) - timedelta(seconds=age)
        self.items[item_id] = {
            "id": item_id,
            "status": status,
            "caption_ids": sorted(captions),
            "updated_at": updated,
            "model_id": None,
            "error": None,
            "image": f"image-{item_id}".encode(),
        }
        self.captions.update(captions)

    def state(self, item_id: int) -> ItemState:
        item = self.items[item_id]
        return ItemState(
            id=item_id,
            status=item["status"],
            image_sha256="0" * 64,
            caption_ids=item["caption_ids"],
            model_id=item["model_id"],
            error=item["error"],
            attempts=1,
            updated_at=item["updated_at"],
        )

    def item(self, item_id: int) -> ItemOut:
        item = self.items[item_id]
        return ItemOut(
            id=item_id,
            collection="c",
            captions=[CaptionOut(id=c, text=self.captions[c]) for c in item["caption_ids"]],
            attributes={},
            tags=[],
            status=item["status"],
            image_sha256="0" * 64,
            content_type="image/png",
            source_uri=None,
            model_id=item["model_id"],
            error=item["error"],
            attempts=1,
            created_at=item["updated_at"],
            updated_at=item["updated_at"],
            indexed_at=None,
        )

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path == "/collections/c/items":
            self.pages += 1
            after = int(request.url.params.get("after", -1))
            rows = sorted(i for i in self.items if i > after)
            page = rows[: self.page_size]
            more = len(rows) > self.page_size
            answer = ItemStatesOut(
                items=[self.state(i) for i in page], next_after=page[-1] if more else None
            )
            return httpx.Response(200, content=answer.model_dump_json())
        if request.method == "GET" and path.startswith("/collections/"):
            return httpx.Response(404, json={"code": "collection_not_found"})
        if request.method == "GET" and path.endswith("/image"):
            item = self.items[int(path.split("/")[2])]
            return httpx.Response(200, content=item["image"], headers={"content-type": "image/png"})
        if request.method == "GET" and path.startswith("/items/"):
            return httpx.Response(200, content=self.item(int(path.split("/")[2])).model_dump_json())
        if request.method == "PATCH" and path.startswith("/items/"):
            item_id = int(path.split("/")[2])
            update = StatusUpdate.model_validate_json(request.content)
            self.items[item_id].update(update.model_dump(exclude_unset=True))
            return httpx.Response(200, content=self.item(item_id).model_dump_json())
        return httpx.Response(404, json={"code": "not_found"})


def embedding(key: str) -> list[float]:
    """The fake feature service's vector for an image's bytes or a caption's text."""
    seed = int.from_bytes(key.encode()[:8].ljust(8, b"\0"), "little")
    v = np.random.default_rng(seed).standard_normal(DIM)
    return (v / np.linalg.norm(v)).tolist()


def fake_feature(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/embed/text":
        texts = TextEmbeddingRequest.model_validate_json(request.content).texts
        vectors = np.asarray([embedding(t) for t in texts], dtype=np.float32)
        answer = TextEmbeddings.of(MODEL, vectors, "base64", truncated=[False] * len(texts))
        return httpx.Response(200, content=answer.model_dump_json(exclude_none=True))
    # multipart: the fake takes the image's bytes from the body
    content = request.content
    start = content.index(b"image-")
    key = content[start : content.index(b"\r\n", start)].decode()
    answer = ImageEmbeddings.of(MODEL, np.asarray([embedding(key)], dtype=np.float32), "base64")
    return httpx.Response(200, content=answer.model_dump_json(exclude_none=True))


@pytest.fixture
def retrieval(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(
        create_app(RetrievalSettings(data_dir=tmp_path), token_keys=KEYS),
        headers=service_headers("retrieval"),
    ) as client:
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield client


@pytest.fixture
def auth(tmp_path: Path) -> Iterator[TestClient]:
    """The real auth service, signing with the key the retrieval app trusts: the command line
    gets its service tokens there, as the reconcile client."""
    with TestClient(create_auth_app(auth_settings(tmp_path / "auth"))) as client:
        yield client


def put_vectors(retrieval: TestClient, modality: str, keys: dict[int, str]) -> None:
    response = retrieval.post(
        "/collections/c/upsert",
        json={
            "modality": modality,
            "model_id": MODEL,
            "ids": list(keys),
            "vectors": [embedding(k) for k in keys.values()],
        },
    )
    assert response.status_code == 200, response.text


def ids_of(retrieval: TestClient, modality: str) -> list[int]:
    response = retrieval.get("/collections/c/ids", params={"modality": modality})
    return response.json()["ids"]


@pytest.fixture
def drifted(retrieval: TestClient) -> FakeMetadata:
    """Five items, drifted five ways (and one fine)."""
    metadata = FakeMetadata()
    metadata.add(1, "indexed", {101: "a red circle"})  # fine
    metadata.add(2, "indexed", {102: "a blue square"})  # lost its image vector
    metadata.add(3, "failed", {103: "a green star"})  # failed, vectors left behind
    metadata.add(4, "pending", {104: "a black star"})  # an add that died: no vectors
    metadata.add(5, "pending", {105: "a pink star"}, age=5)  # an add in flight: vectors, no ack
    for item_id in (1, 3, 5):
        put_vectors(retrieval, "image", {item_id: f"image-{item_id}"})
    put_vectors(retrieval, "text", {c: metadata.captions[c] for c in (101, 102, 103, 105)})
    put_vectors(retrieval, "image", {9: "image-9"})  # an item deleted from metadata only
    put_vectors(retrieval, "text", {109: "gone"})
    return metadata


def _client(name: str, transport: httpx.AsyncBaseTransport) -> ServiceClient:
    return ServiceClient(name, f"http://{name}", transport=transport)


def reconciler(
    retrieval: TestClient, metadata: FakeMetadata, *, feature: bool = True
) -> Reconciler:
    return Reconciler(
        MetadataClient(_client("metadata", httpx.MockTransport(metadata.handle))),
        RetrievalClient(_client("retrieval", Lent(retrieval, "retrieval"))),
        FeatureClient(_client("feature", httpx.MockTransport(fake_feature))) if feature else None,
    )


@pytest.mark.anyio
async def test_check_finds_each_kind_of_drift(retrieval: TestClient, drifted: FakeMetadata) -> None:
    report = await reconciler(retrieval, drifted).check("c", stale_after=timedelta(minutes=10))
    assert report.summary() == {
        "collection": "c",
        "method": "listing",
        "metadata": {"pending": 2, "indexed": 2, "failed": 1},
        "retrieval": {"image": 4, "text": 5},
        "missing": [2],
        "stuck": [4],
        "stale": [3],
        "failed": [3],
        "orphans": {"image": 1, "text": 1},
        "clean": False,
    }
    assert report.orphan_ids == {"image": [9], "text": [109]}
    assert drifted.pages == 3  # five items, two a page: followed next_after
    assert drift_gauge("c", "image", "retrieval_only") == 2  # 9 (orphan), 3 (failed)
    assert drift_gauge("c", "image", "metadata_only") == 2  # 2 (lost), 4 (stuck)
    assert drift_gauge("c", "text", "metadata_only") == 1  # 104


@pytest.mark.anyio
async def test_repair_reindexes_deletes_and_leaves_writes_in_flight_alone(
    retrieval: TestClient, drifted: FakeMetadata
) -> None:
    tool = reconciler(retrieval, drifted)
    report = await tool.check("c")
    repaired = await tool.repair(report)
    assert repaired.errors == []
    assert sorted(repaired.reindexed) == [2, 4]
    assert repaired.vectors_deleted == 4  # orphans 9 and 109, failed item 3 and its caption
    assert drifted.items[4]["status"] == "indexed" and drifted.items[4]["model_id"] == MODEL
    assert drifted.items[3]["status"] == "failed"
    # Item 5 is mid-add (pending for seconds): its vectors stay.
    assert ids_of(retrieval, "image") == [1, 2, 4, 5]
    assert ids_of(retrieval, "text") == [101, 102, 104, 105]
    # The re-embedded vector is the image's: its own best match.
    hit = retrieval.post(
        "/collections/c/search",
        json={"modality": "image", "vectors": [embedding("image-2")], "top_k": 1},
    ).json()["results"][0][0]
    assert hit["id"] == 2 and hit["score"] == pytest.approx(1.0, abs=1e-5)
    after = await tool.check("c")
    assert after.clean and after.summary()["metadata"] == {
        "pending": 1,
        "indexed": 3,
        "failed": 1,
    }
    assert drift_gauge("c", "image", "metadata_only") == 0
    # Failed items come back on request.
    retried = await tool.repair(after, retry_failed=True)
    assert retried.reindexed == [3] and drifted.items[3]["status"] == "indexed"
    assert 3 in ids_of(retrieval, "image") and 103 in ids_of(retrieval, "text")


@pytest.mark.anyio
async def test_without_a_feature_service_drifted_items_are_marked_failed(
    retrieval: TestClient, drifted: FakeMetadata
) -> None:
    tool = reconciler(retrieval, drifted, feature=False)
    repaired = await tool.repair(await tool.check("c"))
    assert repaired.reindexed == [] and sorted(repaired.marked_failed) == [2, 4]
    assert drifted.items[2]["status"] == "failed"
    # Item 2's caption vector went with it: a failed item holds no vectors.
    assert ids_of(retrieval, "image") == [1, 5]
    assert ids_of(retrieval, "text") == [101, 105]
    assert (await tool.check("c")).clean


@pytest.mark.anyio
async def test_a_collection_retrieval_never_saw(retrieval: TestClient) -> None:
    metadata = FakeMetadata()
    metadata.add(1, "indexed", {})
    report = await reconciler(retrieval, metadata).check("c")
    assert report.missing == [1] and report.retrieval_counts == {"image": 0, "text": 0}


@pytest.mark.anyio
async def test_retrieval_is_read_before_metadata(
    retrieval: TestClient, drifted: FakeMetadata
) -> None:
    calls: list[str] = []
    handle = drifted.handle

    def record(request: httpx.Request) -> httpx.Response:
        calls.append(f"metadata {request.url.path}")
        return handle(request)

    drifted.handle = record  # type: ignore[method-assign]
    tool = reconciler(retrieval, drifted)
    lent = tool.retrieval.http._client._transport  # the Lent transport of this reconciler
    assert isinstance(lent, Lent)
    lent.calls = calls
    await tool.check("c")
    listings = [i for i, c in enumerate(calls) if c.startswith("retrieval /collections/c/ids")]
    first_metadata = next(i for i, c in enumerate(calls) if c.startswith("metadata"))
    assert len(listings) == 2 and max(listings) < first_metadata


def test_command_line(
    retrieval: TestClient,
    drifted: FakeMetadata,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    auth: TestClient,
) -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("unreachable", request=request)

    seen: list[str | None] = []

    def metadata(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return drifted.handle(request)

    transports: dict[str, httpx.AsyncBaseTransport] = {
        "http://auth": Lent(auth, "auth"),
        "http://retrieval": Lent(retrieval, "retrieval"),
        "http://metadata": httpx.MockTransport(metadata),
        "http://feature": httpx.MockTransport(fake_feature),
    }

    def client(name: str, base_url: str, credentials: httpx.Auth | None = None) -> ServiceClient:
        transport = transports.get(base_url, httpx.MockTransport(unreachable))
        return ServiceClient(name, base_url, transport=transport, credentials=credentials)

    monkeypatch.setattr(reconcile_module, "service_client", client)
    urls = [
        "--retrieval-url",
        "http://retrieval",
        "--metadata-url",
        "http://metadata",
        "--auth-url",
        "http://auth",
    ]
    assert reconcile_module.main([*urls, "--collection", "c"]) == 1  # drift found
    found = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert found["missing"] == [2] and not found["clean"]
    code = reconcile_module.main(
        [*urls, "--collection", "c", "--repair", "--feature-url", "http://feature"]
    )
    repaired = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 0 and sorted(repaired["repair"]["reindexed"]) == [2, 4]
    # Every metadata call carried the reconcile client's token for metadata.
    assert seen and all(header and header.startswith("Bearer ") for header in seen)
    claims = jwt.decode(seen[0].split()[1], options={"verify_signature": False})
    assert claims["sub"] == "reconcile" and claims["aud"] == "crossmodal:metadata"
    assert claims["scope"].split() == ["metadata:read", "metadata:write"]
