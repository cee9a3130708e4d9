"""In-process API tests: the routes, their problem bodies, metrics and the lifespan."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from services.retrieval import snapshots, wal
from services.retrieval.app import create_app
from services.retrieval.settings import RetrievalSettings
from shared.contracts.vectors import encode_vectors
from tests.service_tokens import KEYS, service_headers

MakeVectors = Callable[[int, int], np.ndarray]
DIM = 8
MODEL = "clip-test"


def wait_ready(client: TestClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.01)


def settings_for(tmp_path: Path, **overrides: Any) -> RetrievalSettings:
    return RetrievalSettings(data_dir=tmp_path, max_batch=16, **overrides)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(
        create_app(settings_for(tmp_path), token_keys=KEYS), headers=service_headers("retrieval")
    ) as c:
        wait_ready(c)
        yield c


def upsert(
    client: TestClient,
    collection: str,
    ids: list[int],
    vectors: np.ndarray | list[list[float]],
    *,
    modality: str = "image",
    model_id: str = MODEL,
) -> Any:
    rows = vectors.tolist() if isinstance(vectors, np.ndarray) else vectors
    return client.post(
        f"/collections/{collection}/upsert",
        json={"modality": modality, "model_id": model_id, "ids": ids, "vectors": rows},
    )


def search(client: TestClient, collection: str, vectors: np.ndarray, **fields: Any) -> Any:
    body = {"modality": "image", "vectors": vectors.tolist(), "top_k": 3, **fields}
    return client.post(f"/collections/{collection}/search", json=body)


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["code"] == code
    assert body["type"].endswith(code) and body["detail"] and body["instance"]
    return body


def test_upsert_search_and_describe(client: TestClient, unit_vectors: MakeVectors) -> None:
    vectors = unit_vectors(5, DIM)
    response = upsert(client, "photos", [10, 11, 12, 13, 14], vectors)
    assert response.status_code == 200
    assert response.json() == {"upserted": 5, "count": 5}
    assert upsert(client, "photos", [20, 21], unit_vectors(2, DIM), modality="text").json() == {
        "upserted": 2,
        "count": 2,
    }

    response = search(client, "photos", vectors[[2, 4]], top_k=2, model_id=MODEL)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [hits[0]["id"] for hits in results] == [12, 14]
    assert results[0][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(results[0]) == 2 and results[0][0]["score"] >= results[0][1]["score"]

    allowed = search(client, "photos", vectors[[2]], top_k=3, allow_ids=[10, 11, 999])
    assert {hit["id"] for hit in allowed.json()["results"][0]} == {10, 11}

    info = {"name": "photos", "model_id": MODEL, "dim": DIM, "counts": {"image": 5, "text": 2}}
    described = client.get("/collections/photos").json()
    assert {k: described[k] for k in info} == info
    assert described["index"]["factory"] == "auto"  # the service default
    assert described["status"]["image"] == {
        "count": 5,
        "index": "Flat",  # what auto chose for five vectors
        "index_entries": 5,
        "stale_entries": 0,
        "rebuilding": False,
    }
    assert client.get("/collections").json() == {"collections": [described]}


def test_vectors_as_base64_rows_search_like_float_lists(
    client: TestClient, unit_vectors: MakeVectors
) -> None:
    vectors = unit_vectors(4, DIM)
    response = client.post(
        "/collections/photos/upsert",
        json={
            "modality": "image",
            "model_id": MODEL,
            "ids": [1, 2, 3, 4],
            "vectors_base64": encode_vectors(vectors),
        },
    )
    assert response.json() == {"upserted": 4, "count": 4}
    queries = vectors[[2, 0]]
    as_lists = search(client, "photos", queries).json()
    body = {"modality": "image", "vectors_base64": encode_vectors(queries), "top_k": 3}
    as_rows = client.post("/collections/photos/search", json=body)
    assert as_rows.status_code == 200
    assert as_rows.json() == as_lists
    assert [hits[0]["id"] for hits in as_lists["results"]] == [3, 1]


@pytest.mark.parametrize(
    "change",
    [
        {"vectors_base64": "not base64!"},
        {"vectors_base64": encode_vectors(np.ones((1, DIM + 1)))},  # not whole rows of DIM
        {"vectors_base64": encode_vectors(np.full((1, DIM), np.nan))},
    ],
)
def test_bad_base64_vectors_are_422(
    client: TestClient, unit_vectors: MakeVectors, change: dict[str, Any]
) -> None:
    assert upsert(client, "photos", [1], unit_vectors(1, DIM)).status_code == 200
    body = {"modality": "image", "top_k": 3, **change}
    assert_problem(client.post("/collections/photos/search", json=body), 422, "invalid_vectors")
    upsert_body = {"modality": "image", "model_id": MODEL, "ids": [5, 6], **change}
    assert_problem(
        client.post("/collections/photos/upsert", json=upsert_body), 422, "invalid_vectors"
    )


def test_vectors_are_given_once(client: TestClient, unit_vectors: MakeVectors) -> None:
    rows = unit_vectors(1, DIM)
    both = {"modality": "image", "vectors": rows.tolist(), "vectors_base64": encode_vectors(rows)}
    assert_problem(client.post("/collections/p/search", json=both), 422, "validation_error")
    assert_problem(
        client.post("/collections/p/search", json={"modality": "image"}), 422, "validation_error"
    )
    upsert_both = {**both, "model_id": MODEL, "ids": [1]}
    assert_problem(client.post("/collections/p/upsert", json=upsert_both), 422, "validation_error")


def test_upsert_replaces_and_delete_removes(client: TestClient, unit_vectors: MakeVectors) -> None:
    first, second = unit_vectors(1, DIM), unit_vectors(1, DIM)
    upsert(client, "c", [1], first)
    assert upsert(client, "c", [1], second).json() == {"upserted": 1, "count": 1}
    hit = search(client, "c", second).json()["results"][0][0]
    assert hit["id"] == 1 and hit["score"] == pytest.approx(1.0, abs=1e-5)

    upsert(client, "c", [1, 2], unit_vectors(2, DIM), modality="text")
    response = client.post("/collections/c/delete", json={"ids": [1, 3], "modality": "text"})
    assert response.json() == {"deleted": 1}
    assert client.get("/collections/c").json()["counts"] == {"image": 1, "text": 1}
    # modality null: every modality; unknown ids are ignored.
    response = client.post("/collections/c/delete", json={"ids": [1, 2, 3]})
    assert response.json() == {"deleted": 2}
    assert client.get("/collections/c").json()["counts"] == {"image": 0, "text": 0}


def test_empty_modality_gives_empty_results(client: TestClient, unit_vectors: MakeVectors) -> None:
    upsert(client, "c", [1], unit_vectors(1, DIM))
    response = search(client, "c", unit_vectors(2, DIM), modality="text")
    assert response.json() == {"results": [[], []]}


def test_unknown_collection_is_404(client: TestClient, unit_vectors: MakeVectors) -> None:
    assert_problem(search(client, "nope", unit_vectors(1, DIM)), 404, "collection_not_found")
    response = client.post("/collections/nope/delete", json={"ids": [1]})
    assert_problem(response, 404, "collection_not_found")
    assert_problem(client.get("/collections/nope"), 404, "collection_not_found")


def test_other_model_is_409(client: TestClient, unit_vectors: MakeVectors) -> None:
    upsert(client, "c", [1], unit_vectors(1, DIM))
    response = upsert(client, "c", [2], unit_vectors(1, DIM), model_id="other")
    body = assert_problem(response, 409, "model_mismatch")
    assert "other" in body["detail"]
    # Checked before the dimension: vectors of another model are what the caller needs to know.
    response = search(client, "c", unit_vectors(1, DIM + 1), model_id="other")
    assert_problem(response, 409, "model_mismatch")
    assert client.get("/collections/c").json()["counts"]["image"] == 1


def test_dimension_mismatch_is_422(client: TestClient, unit_vectors: MakeVectors) -> None:
    upsert(client, "c", [1], unit_vectors(1, DIM))
    assert_problem(upsert(client, "c", [2], unit_vectors(1, DIM + 2)), 422, "dimension_mismatch")
    assert_problem(search(client, "c", unit_vectors(1, DIM - 1)), 422, "dimension_mismatch")
    ragged = [[1.0] * DIM, [1.0] * (DIM - 1)]
    assert_problem(upsert(client, "c", [2, 3], ragged), 422, "dimension_mismatch")
    assert client.get("/collections/c").json()["counts"]["image"] == 1


@pytest.mark.parametrize(
    "change",
    [
        {"ids": [1, 2]},  # two ids, one vector
        {"ids": [1, 1], "vectors": [[1.0] * DIM, [0.5] * DIM]},  # duplicate ids
        {"ids": ["1"]},
        {"ids": [1.0]},
        {"ids": [-1]},
        {"ids": [2**63]},
        {"ids": []},
        {"modality": "audio"},
        {"model_id": ""},
        {"vectors": [[1.0] * (DIM - 1) + ["x"]]},
        {"vectors": [[]]},
    ],
)
def test_invalid_upsert_is_422(client: TestClient, change: dict[str, Any]) -> None:
    body = {"modality": "image", "model_id": MODEL, "ids": [1], "vectors": [[1.0] * DIM]}
    response = client.post("/collections/c/upsert", json={**body, **change})
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"]
    assert_problem(client.get("/collections/c"), 404, "collection_not_found")  # not created


def test_non_finite_components_are_422(client: TestClient) -> None:
    for value in ("NaN", "Infinity", "1e39"):  # 1e39 is finite as a double, not as float32
        content = (
            '{"modality": "image", "model_id": "m", "ids": [1], "vectors": [[' + value + ", 1.0]]}"
        )
        response = client.post(
            "/collections/c/upsert", content=content, headers={"content-type": "application/json"}
        )
        assert_problem(response, 422, "validation_error")
    assert_problem(client.get("/collections/c"), 404, "collection_not_found")


def test_invalid_search_is_422(client: TestClient, unit_vectors: MakeVectors) -> None:
    upsert(client, "c", [1], unit_vectors(1, DIM))
    query = unit_vectors(1, DIM)
    assert_problem(search(client, "c", query, top_k=0), 422, "validation_error")
    assert_problem(search(client, "c", query, top_k=1001), 422, "validation_error")
    assert search(client, "c", query, top_k=1000).status_code == 200
    assert_problem(search(client, "c", query, allow_ids=["a"]), 422, "validation_error")
    assert_problem(search(client, "c", np.zeros((1, DIM))), 422, "zero_vector")


@pytest.mark.parametrize("name", ["Photos", "-photos", "a" * 65, "a.b", "caf%C3%A9"])
def test_invalid_collection_name_is_422(
    client: TestClient, unit_vectors: MakeVectors, name: str
) -> None:
    assert_problem(upsert(client, name, [1], unit_vectors(1, DIM)), 422, "validation_error")
    assert_problem(client.get(f"/collections/{name}"), 422, "validation_error")


def test_longest_valid_collection_name(client: TestClient, unit_vectors: MakeVectors) -> None:
    name = "a" + "b_-9" * 15 + "xyz"
    assert len(name) == 64
    assert upsert(client, name, [1], unit_vectors(1, DIM)).status_code == 200


def test_batches_over_the_limit_are_413(client: TestClient, unit_vectors: MakeVectors) -> None:
    response = upsert(client, "c", list(range(17)), unit_vectors(17, DIM))
    assert_problem(response, 413, "batch_too_large")
    assert upsert(client, "c", list(range(16)), unit_vectors(16, DIM)).status_code == 200
    assert_problem(search(client, "c", unit_vectors(17, DIM)), 413, "batch_too_large")


def test_metrics(client: TestClient, unit_vectors: MakeVectors) -> None:
    upsert(client, "metrics-c", [1, 2, 3], unit_vectors(3, DIM))
    search(client, "metrics-c", unit_vectors(1, DIM))
    text = client.get("/metrics").text
    assert 'retrieval_vectors{collection="metrics-c",modality="image"} 3.0' in text
    assert 'retrieval_vectors{collection="metrics-c",modality="text"} 0.0' in text
    wal_line = next(
        line
        for line in text.splitlines()
        if line.startswith('retrieval_wal_bytes{collection="metrics-c"}')
    )
    assert float(wal_line.split()[-1]) > 3 * DIM * 4
    assert "retrieval_search_seconds_count" in text
    assert "retrieval_snapshot_seconds_count" in text


def test_restart_keeps_everything_and_snapshots_on_shutdown(
    tmp_path: Path, unit_vectors: MakeVectors
) -> None:
    vectors = unit_vectors(4, DIM)
    with TestClient(
        create_app(settings_for(tmp_path), token_keys=KEYS), headers=service_headers("retrieval")
    ) as c:
        wait_ready(c)
        upsert(c, "c", [1, 2, 3, 4], vectors)
        c.post("/collections/c/delete", json={"ids": [2]})
    assert snapshots.generations(tmp_path / "c") == [2]
    assert wal.generations(tmp_path / "c") == [2]
    with TestClient(
        create_app(settings_for(tmp_path), token_keys=KEYS), headers=service_headers("retrieval")
    ) as c:
        wait_ready(c)
        assert c.get("/collections/c").json()["counts"] == {"image": 3, "text": 0}
        results = search(c, "c", vectors, top_k=1).json()["results"]
        best = [hits[0]["id"] for hits in results]
        assert best[0] == 1 and best[2:] == [3, 4]
        assert best[1] in {1, 3, 4}  # id 2 was deleted before the restart


def test_snapshot_runs_after_snapshot_every_writes(
    tmp_path: Path, unit_vectors: MakeVectors
) -> None:
    with TestClient(
        create_app(settings_for(tmp_path, snapshot_every=2), token_keys=KEYS),
        headers=service_headers("retrieval"),
    ) as c:
        wait_ready(c)
        upsert(c, "c", [1], unit_vectors(1, DIM))
        assert snapshots.generations(tmp_path / "c") == []
        upsert(c, "c", [2], unit_vectors(1, DIM))
        # The background task runs after the response, before TestClient returns.
        assert snapshots.generations(tmp_path / "c") == [2]
        assert wal.generations(tmp_path / "c") == [2]


def test_not_ready_when_a_log_is_damaged(tmp_path: Path, unit_vectors: MakeVectors) -> None:
    with TestClient(
        create_app(settings_for(tmp_path), token_keys=KEYS), headers=service_headers("retrieval")
    ) as c:
        wait_ready(c)
        upsert(c, "c", [1], unit_vectors(1, DIM))
        upsert(c, "c", [2], unit_vectors(1, DIM))
    snapshot_gen = wal.generations(tmp_path / "c")[-1]
    log_file = wal.wal_path(tmp_path / "c", snapshot_gen)
    record = wal.encode(wal.Upsert("image", np.array([3]), unit_vectors(1, DIM)))
    damaged = bytearray(record)
    damaged[12] ^= 0xFF
    log_file.write_bytes(bytes(damaged) + record)  # damage followed by an intact record
    with TestClient(
        create_app(settings_for(tmp_path), token_keys=KEYS), headers=service_headers("retrieval")
    ) as c:
        deadline = time.monotonic() + 10
        while (body := c.get("/readyz").json()).get("detail") == "collections are loading":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert body["status"] == 503 and "invalid record" in body["detail"]
        assert_problem(c.get("/collections"), 503, "not_ready")
    assert log_file.read_bytes() == bytes(damaged) + record  # left alone for an operator


# -- collection settings, search depth, id listing -----------------------------------------------


def test_put_creates_a_collection_with_index_settings_then_updates_them(
    client: TestClient, unit_vectors: MakeVectors
) -> None:
    body = {"model_id": MODEL, "dim": DIM, "index": {"factory": "HNSW16", "ef_search": 64}}
    response = client.put("/collections/c", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["index"] == {
        "factory": "HNSW16",
        "nprobe": None,
        "ef_search": 64,
        "rescore_factor": None,
        "storage": "float32",
        "ef_construction": None,
    }
    assert created["counts"] == {"image": 0, "text": 0}
    upsert(client, "c", [1, 2, 3], unit_vectors(3, DIM))
    assert client.get("/collections/c").json()["status"]["image"]["index"] == "HNSW16"
    # Again: 200, and only the fields given change.
    response = client.put("/collections/c", json={**body, "index": {"rescore_factor": 8}})
    assert response.status_code == 200
    assert response.json()["index"]["factory"] == "HNSW16"
    assert response.json()["index"]["rescore_factor"] == 8
    assert response.json()["counts"]["image"] == 3
    response = client.put("/collections/c", json={"model_id": MODEL, "dim": DIM})
    assert response.status_code == 200 and response.json()["index"]["rescore_factor"] == 8


def test_the_first_upsert_may_carry_the_index_settings(
    client: TestClient, unit_vectors: MakeVectors
) -> None:
    body = {"modality": "image", "model_id": MODEL, "ids": [1], "vectors": [[1.0] * DIM]}
    first = {**body, "index": {"factory": "HNSW16", "rescore_factor": 6}}
    assert client.post("/collections/c/upsert", json=first).status_code == 200
    described = client.get("/collections/c").json()
    assert described["index"]["factory"] == "HNSW16"
    assert described["index"]["rescore_factor"] == 6
    # Later upserts do not change the settings (PUT does).
    later = {**body, "ids": [2], "index": {"factory": "Flat"}}
    assert client.post("/collections/c/upsert", json=later).status_code == 200
    assert client.get("/collections/c").json()["index"]["factory"] == "HNSW16"
    bad = {**body, "index": {"factory": "Nope"}}
    assert_problem(client.post("/collections/d/upsert", json=bad), 422, "invalid_index")
    assert_problem(client.get("/collections/d"), 404, "collection_not_found")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"index": {"factory": "NoSuchIndex"}}, 422, "invalid_index"),
        ({"index": {"factory": "IVF4,PQ3"}}, 422, "invalid_index"),  # 3 does not divide 8
        ({"index": {"nprobe": 0}}, 422, "validation_error"),
        ({"index": {"colour": "red"}}, 422, "validation_error"),
        ({"index": {"storage": "float8"}}, 422, "validation_error"),
        ({"dim": 0}, 422, "validation_error"),
    ],
)
def test_put_refuses_invalid_settings(
    client: TestClient, body: dict[str, Any], status: int, code: str
) -> None:
    response = client.put("/collections/c", json={"model_id": MODEL, "dim": DIM, **body})
    assert_problem(response, status, code)
    assert_problem(client.get("/collections/c"), 404, "collection_not_found")


def test_put_refuses_changes_that_need_a_migration(
    client: TestClient, unit_vectors: MakeVectors
) -> None:
    upsert(client, "c", [1], unit_vectors(1, DIM))
    body = {"model_id": MODEL, "dim": DIM, "index": {"storage": "float16-mmap"}}
    assert_problem(client.put("/collections/c", json=body), 409, "index_settings_conflict")
    assert_problem(
        client.put("/collections/c", json={"model_id": "other", "dim": DIM}), 409, "model_mismatch"
    )
    assert_problem(
        client.put("/collections/c", json={"model_id": MODEL, "dim": DIM + 1}),
        422,
        "dimension_mismatch",
    )


def test_search_depth_per_query(client: TestClient, unit_vectors: MakeVectors) -> None:
    client.put(
        "/collections/c",
        json={"model_id": MODEL, "dim": DIM, "index": {"factory": "IVF4,Flat"}},
    )
    vectors = unit_vectors(16, DIM)
    for start in range(0, 1200, 16):  # 1200 vectors: the IVF index is trained
        upsert(client, "c", list(range(start, start + 16)), unit_vectors(16, DIM))
    upsert(client, "c", list(range(5000, 5016)), vectors)
    query = vectors[:1]
    for depth in ({"nprobe": 4}, {"ef_search": 10}, {"rescore_factor": 20}):
        response = search(client, "c", query, top_k=1, **depth)
        assert response.status_code == 200
        assert response.json()["results"][0][0]["id"] == 5000
    for bad in ({"nprobe": 0}, {"ef_search": 40_000}, {"rescore_factor": 101}):
        assert_problem(search(client, "c", query, **bad), 422, "validation_error")


def test_id_listing_json_pages_and_binary(client: TestClient, unit_vectors: MakeVectors) -> None:
    ids = [5, 1, 9, 3, 7, 2**62]
    upsert(client, "c", ids, unit_vectors(len(ids), DIM))
    upsert(client, "c", [4], unit_vectors(1, DIM), modality="text")
    pages, after = [], -1
    while True:
        response = client.get(
            "/collections/c/ids", params={"modality": "image", "after": after, "limit": 4}
        )
        assert response.status_code == 200
        page = response.json()
        pages.append(page["ids"])
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert pages == [[1, 3, 5, 7], [9, 2**62]]
    response = client.get(
        "/collections/c/ids",
        params={"modality": "image", "after": 3},
        headers={"Accept": "application/octet-stream"},
    )
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["x-id-count"] == "4"
    assert np.frombuffer(response.content, dtype="<i8").tolist() == [5, 7, 9, 2**62]
    text = client.get("/collections/c/ids", params={"modality": "text"}).json()
    assert text == {"ids": [4], "next_after": None}
    assert_problem(
        client.get("/collections/c/ids", params={"modality": "audio"}), 422, "validation_error"
    )
    assert_problem(client.get("/collections/c/ids"), 422, "validation_error")
    response = client.get("/collections/c/ids", params={"modality": "image", "limit": 0})
    assert_problem(response, 422, "validation_error")
    assert_problem(
        client.get("/collections/nope/ids", params={"modality": "image"}),
        404,
        "collection_not_found",
    )


def test_state_metrics(tmp_path: Path, unit_vectors: MakeVectors) -> None:
    with TestClient(
        create_app(settings_for(tmp_path, snapshot_every=2), token_keys=KEYS),
        headers=service_headers("retrieval"),
    ) as c:
        wait_ready(c)
        upsert(c, "state-c", [1], unit_vectors(1, DIM))
        upsert(c, "state-c", [2], unit_vectors(1, DIM))  # the second write: a snapshot
        text = c.get("/metrics").text
        age = next(
            line
            for line in text.splitlines()
            if line.startswith('retrieval_snapshot_age_seconds{collection="state-c"}')
        )
        assert 0 <= float(age.split()[-1]) < 60
        assert 'retrieval_last_snapshot_timestamp_seconds{collection="state-c"}' in text
        assert 'retrieval_index_entries{collection="state-c",modality="image"} 2.0' in text
        assert 'retrieval_index_rebuilding{collection="state-c",modality="image"} 0.0' in text
        assert "retrieval_index_build_seconds_count" in text
        assert "retrieval_wal_commit_records_count" in text
    # Once the app has stopped, its store is no longer reported.
    with TestClient(
        create_app(settings_for(tmp_path / "other"), token_keys=KEYS),
        headers=service_headers("retrieval"),
    ) as c:
        wait_ready(c)
        text = c.get("/metrics").text
        assert "retrieval_snapshot_age_seconds" in text
        assert 'retrieval_snapshot_age_seconds{collection="state-c"}' not in text


def test_a_dropped_collection_is_gone_and_its_name_starts_afresh(
    tmp_path: Path, unit_vectors: MakeVectors
) -> None:
    vectors = unit_vectors(4, DIM)
    app = create_app(settings_for(tmp_path), token_keys=KEYS)
    with TestClient(app, headers=service_headers("retrieval")) as c:
        wait_ready(c)
        upsert(c, "c", [1, 2, 3], vectors[:3])
        upsert(c, "keep", [1], vectors[:1])
        assert c.delete("/collections/c").json() == {"name": "c", "dropped": True}
        assert_problem(c.get("/collections/c"), 404, "collection_not_found")
        assert_problem(search(c, "c", vectors[:1]), 404, "collection_not_found")
        # Repeating a drop is harmless: a deletion can be retried until it is known done.
        assert c.delete("/collections/c").json() == {"name": "c", "dropped": False}
        # The name starts afresh: none of the old vectors come back.
        upsert(c, "c", [9], vectors[3:])
        assert [h["id"] for h in search(c, "c", vectors, top_k=4).json()["results"][0]] == [9]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "c",
        "keep",
    ]
    with TestClient(
        create_app(settings_for(tmp_path), token_keys=KEYS), headers=service_headers("retrieval")
    ) as c:
        wait_ready(c)
        assert c.get("/collections/c").json()["counts"] == {"image": 1, "text": 0}
        assert c.get("/collections/keep").json()["counts"] == {"image": 1, "text": 0}


def test_a_drop_cut_short_by_a_crash_is_finished_at_the_next_start(
    tmp_path: Path, unit_vectors: MakeVectors
) -> None:
    with TestClient(
        create_app(settings_for(tmp_path), token_keys=KEYS), headers=service_headers("retrieval")
    ) as c:
        wait_ready(c)
        upsert(c, "c", [1, 2], unit_vectors(2, DIM))
    # What a crash between the rename and the removal leaves: the files under a temporary name.
    (tmp_path / "c").rename(tmp_path / ".tmp-dropped-c-0123")
    with TestClient(
        create_app(settings_for(tmp_path), token_keys=KEYS), headers=service_headers("retrieval")
    ) as c:
        wait_ready(c)
        assert_problem(c.get("/collections/c"), 404, "collection_not_found")
    assert not (tmp_path / ".tmp-dropped-c-0123").exists()
