"""Collections, keyword search, the duplicate policy, thumbnails and ingestion state, on SQLite
and PostgreSQL (see conftest.database_url)."""

from __future__ import annotations

import asyncio
import io
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from services.metadata.settings import MetadataSettings
from tests.services.metadata.support import (
    assert_problem,
    create,
    create_indexed,
    png_bytes,
    stored_files,
    stored_thumbnails,
    upload,
)

# --- collections ------------------------------------------------------------------------------


def test_create_describe_and_list_collections(client: TestClient) -> None:
    response = client.post(
        "/collections",
        json={
            "name": "catalogue",
            "model_id": "openai/clip-vit-base-patch32",
            "index": {"factory": "HNSW32"},
            "description": "spring catalogue",
        },
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["name"] == "catalogue"
    assert created["model_id"] == "openai/clip-vit-base-patch32"
    assert created["index"] == {"factory": "HNSW32"}
    assert created["description"] == "spring catalogue"
    assert created["counts"] == {"pending": 0, "indexed": 0, "failed": 0}
    assert created["items"] == 0 and created["captions"] == 0

    # Defaults: no model yet, a flat index.
    plain = client.post("/collections", json={"name": "plain"}).json()
    assert plain["model_id"] is None and plain["index"] == {"factory": "Flat"}

    assert client.get("/collections/catalogue").json() == created
    names = [c["name"] for c in client.get("/collections").json()["collections"]]
    assert names == ["catalogue", "plain"]


def test_create_collection_refuses_duplicates_and_bad_input(client: TestClient) -> None:
    assert client.post("/collections", json={"name": "once"}).status_code == 201
    assert_problem(client.post("/collections", json={"name": "once"}), 409, "collection_exists")
    for body in (
        {"name": "Not Valid"},
        {"name": "ok", "index": {"factory": "Flat; DROP TABLE items"}},
        {"name": "ok", "index": {"factory": "Flat", "nlist": 3}},
        {"name": "ok", "model_id": ""},
        {"name": "ok", "surprise": 1},
    ):
        assert_problem(client.post("/collections", json=body), 422, "validation_error")
    assert [c["name"] for c in client.get("/collections").json()["collections"]] == ["once"]


def test_collection_takes_the_model_of_its_first_indexed_item(client: TestClient) -> None:
    first = create(client, collection="fresh")
    assert client.get("/collections/fresh").json()["model_id"] is None
    response = client.patch(f"/items/{first['id']}", json={"status": "indexed", "model_id": "m1"})
    assert response.status_code == 200, response.text
    assert response.json()["model_id"] == "m1"
    assert client.get("/collections/fresh").json()["model_id"] == "m1"

    second = create(client, collection="fresh")
    response = client.patch(f"/items/{second['id']}", json={"status": "indexed", "model_id": "m2"})
    assert_problem(response, 409, "model_mismatch")
    assert client.get(f"/items/{second['id']}").json()["status"] == "pending"

    client.post("/collections", json={"name": "declared", "model_id": "m3"})
    third = create(client, collection="declared")
    response = client.patch(f"/items/{third['id']}", json={"status": "indexed", "model_id": "m1"})
    assert_problem(response, 409, "model_mismatch")


def purge(client: TestClient) -> None:
    """What the service's purger does in the background, at once."""
    asyncio.run(client.app.state.purger.purge_all())  # type: ignore[attr-defined]


def test_delete_collection(client: TestClient, settings: MetadataSettings) -> None:
    shared = png_bytes((40, 41, 42))
    gone = create_indexed(client, collection="old", image=shared, captions=["shared lighthouse"])
    create_indexed(client, collection="old", captions=["only here"])
    create(client, collection="old")
    kept = create_indexed(client, collection="keep", image=shared, captions=["kept lighthouse"])
    assert len(stored_files(settings)) == 3

    response = client.delete("/collections/old")
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["collection"], job["state"], job["items"], job["items_left"]) == (
        "old",
        "dropping",
        3,
        3,
    )
    # Gone from every answer at once, its name not free yet.
    assert_problem(client.get("/collections/old"), 404, "collection_not_found")
    assert "old" not in [c["name"] for c in client.get("/collections").json()["collections"]]
    assert_problem(client.post("/collections/old/filter", json={}), 404, "collection_not_found")
    assert_problem(
        client.post("/collections", json={"name": "old"}), 409, "collection_being_deleted"
    )
    assert_problem(upload(client, collection="old"), 409, "collection_being_deleted")
    # Deleting again returns the same deletion.
    assert client.delete("/collections/old").json()["id"] == job["id"]
    assert_problem(client.get(f"/items/{gone['id']}"), 404, "item_not_found")
    assert_problem(client.get(f"/items/{gone['id']}/image"), 404, "item_not_found")
    hits = client.post("/collections/old/hits", json={"target": "image", "ids": [gone["id"]]})
    assert_problem(hits, 404, "collection_not_found")
    # Nothing is purged before the vectors are reported dropped.
    purge(client)
    assert client.get(f"/deletions/{job['id']}").json()["items_left"] == 3
    assert len(stored_files(settings)) == 3
    assert client.get("/deletions", params={"state": "dropping"}).json()["deletions"] == [job]

    dropped = client.post(f"/deletions/{job['id']}/vectors-dropped")
    assert dropped.json()["state"] == "purging"
    purge(client)
    done = client.get(f"/deletions/{job['id']}").json()
    assert (done["state"], done["items_left"]) == ("done", 0) and done["finished_at"]
    assert_problem(client.get(f"/items/{gone['id']}"), 404, "item_not_found")
    assert client.post("/captions/lookup", json={"ids": [gone["captions"][0]["id"]]}).json() == {
        "captions": []
    }
    # The shared file stays for the other collection; the others' files are gone.
    assert [f.name for f in stored_files(settings)] == [kept["image_sha256"]]
    assert client.get(f"/items/{kept['id']}/image").content == shared
    found = keyword(client, "lighthouse", collection="keep")
    assert [hit["id"] for hit in found] == [kept["id"]]
    assert_problem(client.delete("/collections/old"), 404, "collection_not_found")
    # The name is free again, for a collection that starts empty.
    assert client.post("/collections", json={"name": "old"}).status_code == 201
    assert client.get("/collections/old").json()["items"] == 0
    assert_problem(client.get("/deletions/999999"), 404, "deletion_not_found")


def test_a_purge_goes_in_batches_and_resumes(
    client: TestClient, settings: MetadataSettings
) -> None:
    for n in range(5):
        create_indexed(client, collection="big", image=png_bytes((n, 1, 2)), captions=[f"c{n}"])
    job = client.delete("/collections/big").json()
    repository = client.app.state.repository  # type: ignore[attr-defined]
    repository.vectors_dropped(job["id"])  # as the route does, without waking the purger
    # One batch of two, as a purge cut short by a crash would leave it.
    assert repository.purge_step(job["id"], 2) is True
    assert client.get(f"/deletions/{job['id']}").json()["items_left"] == 3
    assert len(stored_files(settings)) == 3
    purge(client)  # what the next round, or a restarted replica, does
    assert client.get(f"/deletions/{job['id']}").json()["state"] == "done"
    assert stored_files(settings) == []
    # The name can be used again, from scratch.
    assert client.post("/collections", json={"name": "old"}).status_code == 201


# --- keyword search -------------------------------------------------------------------------


def keyword(
    client: TestClient, query: str, *, collection: str = "photos", **fields: Any
) -> list[dict[str, Any]]:
    response = client.post(
        f"/collections/{collection}/keyword-search", json={"query": query, **fields}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["target"] == fields.get("target", "image")
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)
    return body["results"]


@pytest.fixture
def coast(client: TestClient) -> dict[str, dict[str, Any]]:
    return {
        "lighthouse": create_indexed(
            client, captions=["a red lighthouse on the coast"], tags=["maritime"]
        ),
        "cottage": create_indexed(
            client,
            captions=[
                "a keeper's cottage with a long garden path",
                "a red door, and far behind a hill, a lighthouse",
                "a small shed and a wooden gate by the wall",
            ],
            attributes={"region": "north"},
        ),
        "forest": create_indexed(client, captions=["a forest path in autumn"], tags=["lighthouse"]),
        "pending": create(client, captions=["a lighthouse being indexed"]),
        "elsewhere": create_indexed(client, collection="other", captions=["another lighthouse"]),
    }


def test_keyword_search_over_captions_and_tags(
    client: TestClient, coast: dict[str, dict[str, Any]]
) -> None:
    found = keyword(client, "lighthouse", top_k=10)
    # Tags count (the forest item is tagged so); pending items and other collections do not.
    assert {hit["id"] for hit in found} == {
        coast[n]["id"] for n in ("lighthouse", "cottage", "forest")
    }
    assert all(hit["item_id"] == hit["id"] for hit in found)
    # Both words close together in a short caption beat both words scattered in long ones.
    best = keyword(client, "red lighthouse")
    assert best[0]["id"] == coast["lighthouse"]["id"]
    assert keyword(client, "MARITIME")[0]["id"] == coast["lighthouse"]["id"]
    assert keyword(client, "autumn")[0]["id"] == coast["forest"]["id"]
    assert keyword(client, "submarine") == []
    assert len(keyword(client, "lighthouse", top_k=2)) == 2


def test_keyword_search_over_captions_returns_caption_ids(
    client: TestClient, coast: dict[str, dict[str, Any]]
) -> None:
    found = keyword(client, "door", target="text")
    cottage = coast["cottage"]
    assert found == [
        {"id": cottage["captions"][1]["id"], "item_id": cottage["id"], "score": found[0]["score"]}
    ]
    # Target text searches caption text only: a tag alone is not a caption match.
    assert keyword(client, "maritime", target="text") == []


def test_keyword_search_with_filters(client: TestClient, coast: dict[str, dict[str, Any]]) -> None:
    found = keyword(client, "lighthouse", filters={"region": "north"})
    assert [hit["id"] for hit in found] == [coast["cottage"]["id"]]
    found = keyword(client, "lighthouse", filters={"$not": {"$tags": "lighthouse"}})
    assert {hit["id"] for hit in found} == {coast["lighthouse"]["id"], coast["cottage"]["id"]}
    response = client.post(
        "/collections/photos/keyword-search",
        json={"query": "lighthouse", "filters": {"region": {"$near": 1}}},
    )
    assert assert_problem(response, 422, "invalid_filter")["pointer"] == "/filters/region/$near"


def test_keyword_search_follows_deletes_and_retries(
    client: TestClient, coast: dict[str, dict[str, Any]]
) -> None:
    client.delete(f"/items/{coast['forest']['id']}")
    assert keyword(client, "autumn") == []
    # A failed item retried with new captions is found by its new words only.
    image = png_bytes((90, 91, 92))
    item = create(client, image=image, captions=["an old harbour"])
    client.patch(f"/items/{item['id']}", json={"status": "failed", "error": "boom"})
    retried = create(client, image=image, captions=["a new marina"])
    assert retried["id"] == item["id"]
    client.patch(f"/items/{item['id']}", json={"status": "indexed"})
    assert [hit["id"] for hit in keyword(client, "marina")] == [item["id"]]
    assert keyword(client, "harbour") == []
    assert keyword(client, "harbour", target="text") == []


def test_keyword_queries_are_words_not_syntax(
    client: TestClient, coast: dict[str, dict[str, Any]]
) -> None:
    # FTS5 and tsquery operators in the text are ignored, never interpreted (or an error).
    for query in ('lighthouse" OR * NEAR(', "lighthouse & !door | (", "lighthouse' --"):
        assert {hit["id"] for hit in keyword(client, query)} == {
            coast[n]["id"] for n in ("lighthouse", "cottage", "forest")
        }
    response = client.post("/collections/photos/keyword-search", json={"query": "?! ..."})
    assert_problem(response, 422, "invalid_query")
    response = client.post("/collections/nowhere/keyword-search", json={"query": "x"})
    assert_problem(response, 404, "collection_not_found")
    response = client.post("/collections/photos/keyword-search", json={"query": "x", "top_k": 0})
    assert_problem(response, 422, "validation_error")


# --- duplicates -------------------------------------------------------------------------------


def test_duplicate_policy(client: TestClient, settings: MetadataSettings) -> None:
    image = png_bytes((70, 71, 72))
    first = create(client, image=image, captions=["first"], tags=["a"])

    # Pending: someone is indexing it (or it is stuck until reconcile repairs it).
    body = assert_problem(upload(client, image=image), 409, "duplicate_pending")
    assert body["item_id"] == first["id"] and body["item_status"] == "pending"

    # Failed: the upload is the retry; same id, the new captions, tags and attributes.
    client.patch(f"/items/{first['id']}", json={"status": "failed", "error": "feature timeout"})
    response = upload(
        client, image=image, captions=["second", "third"], tags=["b"], attributes={"k": 1}
    )
    assert response.status_code == 201, response.text
    retried = response.json()
    assert retried["id"] == first["id"]
    assert retried["status"] == "pending"
    assert [c["text"] for c in retried["captions"]] == ["second", "third"]
    assert retried["tags"] == ["b"] and retried["attributes"] == {"k": 1}
    assert retried["attempts"] == 1 and retried["error"] == "feature timeout"
    old_caption = first["captions"][0]["id"]
    assert client.post("/captions/lookup", json={"ids": [old_caption]}).json() == {"captions": []}

    # Indexed: a plain duplicate.
    client.patch(f"/items/{first['id']}", json={"status": "indexed"})
    body = assert_problem(upload(client, image=image), 409, "duplicate_item")
    assert body["item_id"] == first["id"] and body["item_status"] == "indexed"
    assert client.get(f"/items/{first['id']}").json()["captions"] == retried["captions"]

    # Another collection may hold the same bytes; the file is still stored once.
    other = create(client, image=image, collection="other")
    assert other["id"] != first["id"]
    assert len(stored_files(settings)) == 1


def merge(client: TestClient, item_id: int, **body: Any) -> Any:
    return client.post(f"/items/{item_id}/merge", json=body)


def test_a_duplicate_merges_into_the_indexed_item(client: TestClient) -> None:
    image = png_bytes((73, 74, 75))
    item = create_indexed(
        client,
        image=image,
        captions=["flag: France"],
        tags=["flag"],
        attributes={"emoji": "FR", "n": 1, "shown": True},
    )
    # The same image again, as a second record brings it: answered 409 with the item's id.
    body = assert_problem(upload(client, image=image), 409, "duplicate_item")
    assert body["item_id"] == item["id"]

    response = merge(
        client,
        body["item_id"],
        captions=["flag: St. Martin", "  flag:   France ", "flag: St. Martin", "Flag: France"],
        tags=["flag", "caribbean"],
        attributes={"emoji": "MF", "n": 1.0, "shown": 1, "region": "caribbean"},
    )
    assert response.status_code == 200, response.text
    merged = response.json()
    # Captions: the same text once (whitespace does not make another caption, case does).
    assert [c["text"] for c in merged["added_captions"]] == ["flag: St. Martin", "Flag: France"]
    assert merged["added_tags"] == ["caribbean"]
    assert merged["added_attributes"] == ["region"]
    # The item's values win: 1 and 1.0 are equal, true and 1 are not.
    assert merged["conflicts"] == [
        {"key": "emoji", "kept": "FR", "offered": "MF"},
        {"key": "shown", "kept": True, "offered": 1},
    ]
    after = client.get(f"/items/{item['id']}").json()
    assert after == merged["item"]
    assert [c["text"] for c in after["captions"]] == [
        "flag: France",
        "flag: St. Martin",
        "Flag: France",
    ]
    assert after["captions"][0] == item["captions"][0]  # kept, same id
    assert [c["id"] for c in after["captions"][1:]] == [c["id"] for c in merged["added_captions"]]
    assert after["tags"] == ["flag", "caribbean"]
    assert after["attributes"] == {"emoji": "FR", "n": 1, "shown": True, "region": "caribbean"}
    assert after["status"] == "indexed" and after["updated_at"] > item["updated_at"]
    # The new words are searchable, the new captions are captions of the item, and the filter's
    # allow-list lists them.
    assert [hit["id"] for hit in keyword(client, "martin")] == [item["id"]]
    found = keyword(client, "martin", target="text")
    assert [hit["id"] for hit in found] == [merged["added_captions"][0]["id"]]
    assert [hit["id"] for hit in keyword(client, "caribbean")] == [item["id"]]
    allowed = client.post("/collections/photos/filter", json={"filters": {"region": "caribbean"}})
    assert allowed.json() == {
        "item_ids": [item["id"]],
        "caption_ids": [c["id"] for c in after["captions"]],
    }

    # The same merge again adds nothing and changes nothing.
    again = merge(client, item["id"], captions=["flag: St. Martin"], tags=["caribbean"])
    assert again.status_code == 200, again.text
    assert again.json()["added_captions"] == [] and again.json()["added_tags"] == []
    assert again.json()["item"] == after
    empty = merge(client, item["id"])
    assert empty.status_code == 200 and empty.json()["item"] == after


def test_merge_takes_indexed_items_only_and_keeps_their_limits(client: TestClient) -> None:
    pending = create(client, captions=["pending"])
    body = assert_problem(merge(client, pending["id"], captions=["x"]), 409, "item_not_indexed")
    assert body["item_id"] == pending["id"] and body["item_status"] == "pending"
    client.patch(f"/items/{pending['id']}", json={"status": "failed", "error": "boom"})
    body = assert_problem(merge(client, pending["id"], captions=["x"]), 409, "item_not_indexed")
    assert body["item_status"] == "failed"
    assert_problem(merge(client, 987654, captions=["x"]), 404, "item_not_found")
    assert_problem(merge(client, 2**70, captions=["x"]), 404, "item_not_found")

    # The settings allow 4 captions per item: 3 there and 2 new ones are one too many.
    item = create_indexed(client, captions=["one", "two", "three"], tags=["t"])
    body = assert_problem(merge(client, item["id"], captions=["four", "five"]), 409, "item_limit")
    assert "5 captions" in body["detail"]
    too_many_tags = [f"tag {n}" for n in range(64)]
    assert_problem(merge(client, item["id"], tags=too_many_tags), 409, "item_limit")
    assert client.get(f"/items/{item['id']}").json() == item  # nothing merged
    # Captions already there do not count: the one new caption fits.
    response = merge(client, item["id"], captions=["one", "two", "three", "four"])
    assert [c["text"] for c in response.json()["added_captions"]] == ["four"]

    # Each part is checked as an upload's is.
    assert_problem(merge(client, item["id"], captions=[" "]), 422, "invalid_caption")
    assert_problem(merge(client, item["id"], tags=["-bad-"]), 422, "invalid_tag")
    assert_problem(merge(client, item["id"], attributes={"$x": 1}), 422, "invalid_attributes")
    assert_problem(merge(client, item["id"], attributes={"x": [1]}), 422, "invalid_attributes")
    assert_problem(merge(client, item["id"], colour="red"), 422, "validation_error")


def test_captions_a_merge_added_can_be_taken_back(client: TestClient) -> None:
    item = create_indexed(client, captions=["a quiet harbour"], tags=["sea"])
    other = create_indexed(client, captions=["a busy harbour"])
    added = merge(client, item["id"], captions=["a lighthouse at dusk"], tags=["light"]).json()
    (caption,) = added["added_captions"]

    # Ids of another item's captions, or of none, are left alone.
    response = client.post(
        f"/items/{item['id']}/captions/delete",
        json={"ids": [caption["id"], other["captions"][0]["id"], 987654]},
    )
    assert response.status_code == 200, response.text
    assert [c["text"] for c in response.json()["captions"]] == ["a quiet harbour"]
    assert response.json()["tags"] == ["sea", "light"]  # tags need no vectors: they stay
    assert keyword(client, "lighthouse") == []
    assert keyword(client, "dusk", target="text") == []
    assert client.get(f"/items/{other['id']}").json()["captions"] == other["captions"]
    lookup = client.post("/captions/lookup", json={"ids": [caption["id"]]})
    assert lookup.json() == {"captions": []}
    assert_problem(
        client.post("/items/987654/captions/delete", json={"ids": [1]}), 404, "item_not_found"
    )


def test_concurrent_merges_into_one_item_keep_every_caption(client: TestClient) -> None:
    item = create_indexed(client, captions=["start"])
    answers: list[Any] = []

    def worker(index: int) -> None:
        answers.append(merge(client, item["id"], captions=[f"caption {index}"], tags=[f"t{index}"]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
    after = client.get(f"/items/{item['id']}").json()
    assert sorted(c["text"] for c in after["captions"]) == [
        "caption 0",
        "caption 1",
        "caption 2",
        "start",
    ]
    assert sorted(after["tags"]) == ["t0", "t1", "t2"]


def test_hashes_lookup(client: TestClient) -> None:
    image = png_bytes((80, 81, 82))
    item = create(client, image=image)
    unknown = "0" * 64
    response = client.post(
        "/collections/photos/hashes", json={"sha256": [unknown, item["image_sha256"]]}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "items": [{"sha256": item["image_sha256"], "id": item["id"], "status": "pending"}]
    }
    bad = client.post("/collections/photos/hashes", json={"sha256": ["xyz"]})
    assert_problem(bad, 422, "validation_error")
    missing = client.post("/collections/none/hashes", json={"sha256": [unknown]})
    assert_problem(missing, 404, "collection_not_found")


# --- thumbnails -------------------------------------------------------------------------------


def image_bytes(size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG") -> bytes:
    image = Image.new(mode, size, (10, 200, 30, 128) if mode == "RGBA" else (10, 200, 30))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_thumbnails_are_made_at_ingest_and_served(
    client: TestClient, settings: MetadataSettings
) -> None:
    item = create(client, image=image_bytes((600, 300)))
    assert len(stored_thumbnails(settings)) == 1  # made at ingest, not at first request
    response = client.get(f"/items/{item['id']}/image", params={"size": "thumb"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as thumb:
        assert thumb.format == "JPEG"
        assert thumb.size == (settings.thumbnail_size, settings.thumbnail_size // 2)
    etag = response.headers["etag"]
    assert etag != client.get(f"/items/{item['id']}/image").headers["etag"]
    again = client.get(
        f"/items/{item['id']}/image", params={"size": "thumb"}, headers={"If-None-Match": etag}
    )
    assert again.status_code == 304

    # Transparent images get a white background, not black.
    clear = create(client, image=image_bytes((40, 40), mode="RGBA"))
    data = client.get(f"/items/{clear['id']}/image", params={"size": "thumb"}).content
    with Image.open(io.BytesIO(data)) as thumb:
        red, green, blue = thumb.convert("RGB").getpixel((20, 20))
        assert red > 100 and green > 200 and blue > 100  # green blended with white

    # A thumbnail that went missing (or predates thumbnails) is made again on demand.
    for path in stored_thumbnails(settings):
        path.unlink()
    response = client.get(f"/items/{item['id']}/image", params={"size": "thumb"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert_problem(
        client.get(f"/items/{item['id']}/image", params={"size": "huge"}), 422, "validation_error"
    )


def test_undecodable_pixels_are_refused_at_ingest(
    client: TestClient, settings: MetadataSettings
) -> None:
    # A JPEG whose header is fine but whose scan data is cut off passes the header checks; the
    # thumbnail's full decode catches it.
    data = image_bytes((64, 64), fmt="JPEG")
    truncated = data[: len(data) // 2]
    assert_problem(upload(client, image=truncated), 422, "invalid_image")
    assert stored_files(settings) == []


# --- ingestion state ----------------------------------------------------------------------


def test_status_updates_record_model_errors_and_attempts(client: TestClient) -> None:
    item = create(client, source_uri="s3://photos/a.png", tags=["x"])
    assert item["source_uri"] == "s3://photos/a.png"
    failed = client.patch(f"/items/{item['id']}", json={"status": "failed", "error": "timeout"})
    assert failed.json()["error"] == "timeout" and failed.json()["attempts"] == 1
    failed = client.patch(f"/items/{item['id']}", json={"status": "failed"})
    assert failed.json()["error"] == "unknown error" and failed.json()["attempts"] == 2
    indexed = client.patch(
        f"/items/{item['id']}", json={"status": "indexed", "model_id": "tiny-clip"}
    ).json()
    assert indexed["status"] == "indexed" and indexed["model_id"] == "tiny-clip"
    assert indexed["error"] is None and indexed["attempts"] == 2
    assert indexed["indexed_at"] is not None
    assert_problem(
        client.patch(f"/items/{item['id']}", json={"status": "indexed", "model_id": ""}),
        422,
        "validation_error",
    )


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [("tag", " ", "invalid_tag"), ("tag", "a" * 65, "invalid_tag"), ("tag", "x\ny", "invalid_tag")],
)
def test_invalid_tags(client: TestClient, field: str, value: str, code: str) -> None:
    response = client.post(
        "/items",
        data={"collection": "photos", field: [value]},
        files={"image": ("a.png", png_bytes(), "image/png")},
    )
    assert_problem(response, 422, code)


def test_tags_are_trimmed_and_deduplicated(client: TestClient) -> None:
    item = create(client, tags=[" sea ", "sky", "sea", "New York"])
    assert item["tags"] == ["sea", "sky", "New York"]
    assert_problem(upload(client, source_uri="x" * 3000), 422, "invalid_source_uri")


@pytest.mark.parametrize(
    "uri",
    [
        "http://example.com/a.png",
        "https://example.com:8443/a%20b.png?x=1#f",
        "  HTTPS://example.com/a b.png  ",  # any letter case; surrounding space trimmed
        "s3://bucket/key/a.png",
        "gs://bucket/a.png",
        "https://example.com/@someone/a.png",  # an @ in the path is no credential
        "\u3000https://example.com/a.png\u00a0",  # Unicode white space is trimmed too
    ],
)
def test_source_uri_keeps_links_a_reader_may_follow(client: TestClient, uri: str) -> None:
    assert create(client, source_uri=uri)["source_uri"] == uri.strip()


@pytest.mark.parametrize(
    "uri",
    [
        "javascript:alert(document.cookie)",
        "JavaScript://example.com/%0aalert(1)",
        "data:text/html,<script>alert(1)</script>",
        "file:///etc/passwd",
        "file://server/share/a.png",
        "ftp://example.com/a.png",
        "vbscript:msgbox(1)",
        "//example.com/a.png",  # scheme-relative
        "/photos/a.png",
        "https:/example.com/a.png",
        "https:///etc/passwd",  # no host
        "https://user:secret@example.com/a.png",  # credentials would be shown to every reader
        "https://user@example.com/a.png",
        "https://exa mple.com/a.png",
        "https://example.com/a\x00.png",
        "https://example.com/a\n.png",
        # White space in the host: none could be told from the space trimmed around the URI.
        "\x0b s3://\u00a0\n\x0c",
        "https://exa\u3000mple.com/a.png",
        "https://example.com\x85/a.png",
        "https://" + "x" * 2041,
    ],
)
def test_source_uri_refuses_other_schemes(client: TestClient, uri: str) -> None:
    response = upload(client, source_uri=uri)
    assert_problem(response, 422, "invalid_source_uri")
    assert "http, https, s3, gs" in response.json()["detail"]


def test_item_states_page_by_status(client: TestClient) -> None:
    items = [create(client, captions=[f"c{i}"]) for i in range(5)]
    for item in items[:3]:
        client.patch(f"/items/{item['id']}", json={"status": "failed", "error": "e"})

    def page(**params: Any) -> dict[str, Any]:
        response = client.get("/collections/photos/items", params=params)
        assert response.status_code == 200, response.text
        return response.json()

    first = page(status="failed", limit=2)
    assert [s["id"] for s in first["items"]] == [items[0]["id"], items[1]["id"]]
    assert first["items"][0]["caption_ids"] == [items[0]["captions"][0]["id"]]
    assert first["items"][0]["error"] == "e" and first["items"][0]["attempts"] == 1
    second = page(status="failed", limit=2, after=first["next_after"])
    assert [s["id"] for s in second["items"]] == [items[2]["id"]]
    assert second["next_after"] is None
    assert [s["id"] for s in page(status="pending")["items"]] == [i["id"] for i in items[3:]]
    assert len(page()["items"]) == 5
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert page(updated_before=past)["items"] == []
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert len(page(updated_before=future)["items"]) == 5
    assert_problem(client.get("/collections/none/items"), 404, "collection_not_found")
    assert_problem(client.get("/collections/photos/items?status=odd"), 422, "validation_error")
