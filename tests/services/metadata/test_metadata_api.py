"""HTTP API of the metadata service, on SQLite and PostgreSQL (see conftest.database_url)."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.metadata.app import create_app
from services.metadata.settings import MetadataSettings
from tests.service_tokens import KEYS, service_headers
from tests.services.metadata.support import (
    assert_problem,
    create,
    create_indexed,
    jpeg_bytes,
    png_bytes,
    stored_files,
    stored_thumbnails,
    upload,
)


def parse_utc(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0, value
    return parsed


# --- create, get, image ----------------------------------------------------------------------


def test_create_get_and_image_round_trip(client: TestClient) -> None:
    image = png_bytes()
    # The client's claimed content type is wrong on purpose: the stored one is detected.
    response = upload(
        client,
        image=image,
        captions=["  a red square ", "crimson tile"],
        attributes={"year": 2020, "source": "web", "ok": True, "score": 0.5, "note": None},
        content_type="image/jpeg",
    )
    assert response.status_code == 201, response.text
    item = response.json()
    assert set(item) == {
        "id",
        "collection",
        "captions",
        "attributes",
        "status",
        "image_sha256",
        "content_type",
        "created_at",
        "updated_at",
        "tags",
        "source_uri",
        "model_id",
        "error",
        "attempts",
        "indexed_at",
    }
    assert isinstance(item["id"], int)
    assert item["tags"] == [] and item["source_uri"] is None and item["model_id"] is None
    assert item["error"] is None and item["attempts"] == 0 and item["indexed_at"] is None
    assert item["collection"] == "photos"
    assert item["status"] == "pending"
    assert item["content_type"] == "image/png"
    assert [c["text"] for c in item["captions"]] == ["a red square", "crimson tile"]
    assert len({c["id"] for c in item["captions"]}) == 2
    assert item["attributes"] == {
        "year": 2020,
        "source": "web",
        "ok": True,
        "score": 0.5,
        "note": None,
    }
    created = parse_utc(item["created_at"])
    assert abs((datetime.now(UTC) - created).total_seconds()) < 60
    assert parse_utc(item["updated_at"]) == created

    fetched = client.get(f"/items/{item['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == item

    image_response = client.get(f"/items/{item['id']}/image")
    assert image_response.status_code == 200
    assert image_response.content == image
    assert image_response.headers["content-type"] == "image/png"
    etag = image_response.headers["etag"]
    assert etag == f'"{item["image_sha256"]}"'

    cached = client.get(f"/items/{item['id']}/image", headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.content == b""


def test_jpeg_content_type_is_detected(client: TestClient) -> None:
    item = create(client, image=jpeg_bytes(), content_type="image/png", filename="x.png")
    assert item["content_type"] == "image/jpeg"
    assert client.get(f"/items/{item['id']}/image").headers["content-type"] == "image/jpeg"


def test_a_jpeg_zip_polyglot_is_served_as_an_image_a_browser_will_not_sniff(
    client: TestClient,
) -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("index.html", "<script>alert(document.domain)</script>")
    polyglot = jpeg_bytes() + archive.getvalue()
    item = create(client, image=polyglot, content_type="text/html", filename="x.html")
    assert item["content_type"] == "image/jpeg"  # detected, not what the client claimed

    response = client.get(f"/items/{item['id']}/image")
    assert response.content == polyglot
    assert zipfile.ZipFile(io.BytesIO(response.content)).read("index.html")  # still a ZIP
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-security-policy"] == "default-src 'none'; sandbox"
    assert response.headers["content-disposition"] == f'inline; filename="item-{item["id"]}.jpg"'
    cached = client.get(
        f"/items/{item['id']}/image", headers={"If-None-Match": response.headers["etag"]}
    )
    assert cached.status_code == 304 and cached.headers["x-content-type-options"] == "nosniff"
    thumb = client.get(f"/items/{item['id']}/image", params={"size": "thumb"})
    assert thumb.headers["content-type"] == "image/jpeg"
    assert thumb.headers["x-content-type-options"] == "nosniff"
    assert thumb.headers["content-disposition"] == (
        f'inline; filename="item-{item["id"]}-thumb.jpg"'
    )


def test_item_without_captions_or_attributes(client: TestClient) -> None:
    item = create(client)
    assert item["captions"] == []
    assert item["attributes"] == {}


def test_ids_are_distinct_across_items(client: TestClient) -> None:
    first = create(client, captions=["one"])
    second = create(client, captions=["two"])
    assert first["id"] != second["id"]
    assert first["captions"][0]["id"] != second["captions"][0]["id"]


def test_patch_status_updates_timestamp(client: TestClient) -> None:
    item = create(client)
    response = client.patch(f"/items/{item['id']}", json={"status": "failed"})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "failed"
    assert parse_utc(body["updated_at"]) >= parse_utc(item["updated_at"])
    assert client.get(f"/items/{item['id']}").json()["status"] == "failed"


def test_patch_rejects_unknown_status(client: TestClient) -> None:
    item = create(client)
    assert_problem(
        client.patch(f"/items/{item['id']}", json={"status": "done"}), 422, "validation_error"
    )
    assert client.get(f"/items/{item['id']}").json()["status"] == "pending"


# --- image storage -----------------------------------------------------------------------------


def test_identical_images_are_stored_once(client: TestClient, settings: MetadataSettings) -> None:
    # The same bytes in two collections: two items, one file.
    image = png_bytes((1, 2, 3))
    first = create(client, image=image)
    second = create(client, image=image, collection="elsewhere")
    other = create(client, image=png_bytes((4, 5, 6)))
    assert first["image_sha256"] == second["image_sha256"] != other["image_sha256"]
    files = stored_files(settings)
    assert len(files) == 2
    shared = next(f for f in files if f.name == first["image_sha256"])
    assert shared.read_bytes() == image
    # Sharded by the first hash characters.
    assert shared.parent.name == first["image_sha256"][2:4]
    assert shared.parent.parent.name == first["image_sha256"][:2]

    # The file stays while another item still uses it, and goes with the last one.
    assert client.delete(f"/items/{first['id']}").status_code == 204
    assert shared.exists()
    assert client.get(f"/items/{second['id']}/image").content == image
    assert client.delete(f"/items/{second['id']}").status_code == 204
    assert not shared.exists()
    assert [f.name for f in stored_files(settings)] == [other["image_sha256"]]
    # The thumbnails go with their original.
    assert [f.name.split("-")[0] for f in stored_thumbnails(settings)] == [other["image_sha256"]]


# --- delete ------------------------------------------------------------------------------------


def test_delete_removes_item_and_captions(client: TestClient) -> None:
    item = create(client, captions=["gone soon"])
    caption_id = item["captions"][0]["id"]
    response = client.delete(f"/items/{item['id']}")
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(client.get(f"/items/{item['id']}"), 404, "item_not_found")
    assert_problem(client.get(f"/items/{item['id']}/image"), 404, "item_not_found")
    assert client.post("/captions/lookup", json={"ids": [caption_id]}).json() == {"captions": []}
    assert_problem(client.delete(f"/items/{item['id']}"), 404, "item_not_found")


# --- lookups -----------------------------------------------------------------------------------


def test_items_lookup_keeps_request_order_and_drops_missing(client: TestClient) -> None:
    a, b, c = (create(client, captions=[name]) for name in ("a", "b", "c"))
    missing = c["id"] + 1000
    response = client.post(
        "/items/lookup", json={"ids": [c["id"], missing, a["id"], b["id"], a["id"]]}
    )
    assert response.status_code == 200
    items = response.json()["items"]
    assert [i["id"] for i in items] == [c["id"], a["id"], b["id"]]
    assert items[0] == client.get(f"/items/{c['id']}").json()
    assert client.post("/items/lookup", json={"ids": []}).json() == {"items": []}
    # An id no database can hold is simply absent, not an error.
    assert client.post("/items/lookup", json={"ids": [2**70]}).json() == {"items": []}


def test_hits_come_with_their_items_in_one_call(client: TestClient) -> None:
    a = create_indexed(client, captions=["a one", "a two"])
    b = create_indexed(client, captions=["b"])
    pending = create(client, captions=["not yet"])
    elsewhere = create_indexed(client, collection="other", captions=["elsewhere"])
    missing = b["id"] + 1000
    images = client.post(
        "/collections/photos/hits",
        json={
            "target": "image",
            "ids": [b["id"], missing, pending["id"], a["id"], elsewhere["id"], b["id"]],
        },
    )
    assert images.status_code == 200
    assert images.json() == {
        "hits": [
            {"id": b["id"], "caption": None, "item": client.get(f"/items/{b['id']}").json()},
            {"id": a["id"], "caption": None, "item": client.get(f"/items/{a['id']}").json()},
        ]
    }
    a_two, a_one = a["captions"][1], a["captions"][0]
    texts = client.post(
        "/collections/photos/hits",
        json={
            "target": "text",
            "ids": [
                a_two["id"],
                pending["captions"][0]["id"],
                b["captions"][0]["id"],
                elsewhere["captions"][0]["id"],
                a_one["id"],
                10**12,
            ],
        },
    ).json()["hits"]
    assert [(h["id"], h["caption"], h["item"]["id"]) for h in texts] == [
        (a_two["id"], a_two, a["id"]),
        (b["captions"][0]["id"], b["captions"][0], b["id"]),
        (a_one["id"], a_one, a["id"]),
    ]
    assert client.post("/collections/photos/hits", json={"target": "text", "ids": []}).json() == {
        "hits": []
    }
    assert_problem(
        client.post("/collections/photos/hits", json={"target": "both", "ids": [1]}),
        422,
        "validation_error",
    )


def test_items_lookup_limits_ids(client: TestClient) -> None:
    assert_problem(
        client.post("/items/lookup", json={"ids": list(range(10_001))}), 422, "validation_error"
    )
    assert_problem(client.post("/items/lookup", json={"ids": ["1"]}), 422, "validation_error")


def test_captions_lookup(client: TestClient) -> None:
    first = create(client, captions=["first one", "first two"])
    second = create(client, captions=["second"])
    wanted = [second["captions"][0]["id"], 10**12, first["captions"][1]["id"]]
    response = client.post("/captions/lookup", json={"ids": wanted})
    assert response.status_code == 200
    assert response.json() == {
        "captions": [
            {"id": wanted[0], "item_id": second["id"], "text": "second"},
            {"id": wanted[2], "item_id": first["id"], "text": "first two"},
        ]
    }


# --- filters -----------------------------------------------------------------------------------


@pytest.fixture
def catalogue(client: TestClient) -> dict[str, dict[str, Any]]:
    items = {
        "cat2020": create_indexed(
            client, captions=["a cat"], attributes={"animal": "cat", "year": 2020, "hd": True}
        ),
        "dog2020": create_indexed(
            client,
            captions=["a dog", "a puppy"],
            attributes={"animal": "dog", "year": 2020.0, "hd": False},
        ),
        "cat2021": create_indexed(
            client, captions=["another cat"], attributes={"animal": "cat", "year": 2021}
        ),
        # Looks like year 2020 but is a string, and a boolean/number lookalike.
        "text_year": create_indexed(
            client, attributes={"animal": "bird", "year": "2020", "hd": 1, "tag": None}
        ),
        "pending_cat": create(client, attributes={"animal": "cat", "year": 2020}),
        "other_collection": create_indexed(
            client, collection="other", attributes={"animal": "cat", "year": 2020}
        ),
    }
    return items


def run_filter(client: TestClient, filters: Any, collection: str = "photos") -> dict[str, Any]:
    response = client.post(f"/collections/{collection}/filter", json={"filters": filters})
    assert response.status_code == 200, response.text
    return response.json()


def ids_of(catalogue: dict[str, dict[str, Any]], *names: str) -> list[int]:
    return sorted(catalogue[n]["id"] for n in names)


def caption_ids_of(catalogue: dict[str, dict[str, Any]], *names: str) -> list[int]:
    return sorted(c["id"] for n in names for c in catalogue[n]["captions"])


def test_filter_without_filters_returns_all_indexed_items(
    client: TestClient, catalogue: dict[str, dict[str, Any]]
) -> None:
    names = ("cat2020", "dog2020", "cat2021", "text_year")
    for filters in ({}, None):
        result = run_filter(client, filters)
        assert result["item_ids"] == ids_of(catalogue, *names)
        assert result["caption_ids"] == caption_ids_of(catalogue, *names)


def test_filter_equality(client: TestClient, catalogue: dict[str, dict[str, Any]]) -> None:
    result = run_filter(client, {"animal": "cat"})
    # The pending cat and the cat in another collection are not in the allow-list.
    assert result["item_ids"] == ids_of(catalogue, "cat2020", "cat2021")
    assert result["caption_ids"] == caption_ids_of(catalogue, "cat2020", "cat2021")


def test_filter_respects_json_types(
    client: TestClient, catalogue: dict[str, dict[str, Any]]
) -> None:
    # 2020 and 2020.0 are the same number; the string "2020" is not.
    assert run_filter(client, {"year": 2020})["item_ids"] == ids_of(catalogue, "cat2020", "dog2020")
    assert run_filter(client, {"year": "2020"})["item_ids"] == ids_of(catalogue, "text_year")
    # true is not 1, false is not 0.
    assert run_filter(client, {"hd": True})["item_ids"] == ids_of(catalogue, "cat2020")
    assert run_filter(client, {"hd": 1})["item_ids"] == ids_of(catalogue, "text_year")
    assert run_filter(client, {"hd": False})["item_ids"] == ids_of(catalogue, "dog2020")
    # null matches an explicit null only, not a missing key.
    assert run_filter(client, {"tag": None})["item_ids"] == ids_of(catalogue, "text_year")


def test_filter_list_of_values(client: TestClient, catalogue: dict[str, dict[str, Any]]) -> None:
    result = run_filter(client, {"animal": ["dog", "bird"]})
    assert result["item_ids"] == ids_of(catalogue, "dog2020", "text_year")
    assert result["caption_ids"] == caption_ids_of(catalogue, "dog2020", "text_year")
    assert run_filter(client, {"year": [2021, "2020"]})["item_ids"] == ids_of(
        catalogue, "cat2021", "text_year"
    )


def test_filter_multiple_keys(client: TestClient, catalogue: dict[str, dict[str, Any]]) -> None:
    assert run_filter(client, {"animal": "cat", "year": 2020})["item_ids"] == ids_of(
        catalogue, "cat2020"
    )
    assert run_filter(client, {"animal": ["cat", "dog"], "year": [2020]})["item_ids"] == ids_of(
        catalogue, "cat2020", "dog2020"
    )


def test_filter_without_matches(client: TestClient, catalogue: dict[str, dict[str, Any]]) -> None:
    assert run_filter(client, {"animal": "fish"}) == {"item_ids": [], "caption_ids": []}
    assert run_filter(client, {"colour": "red"}) == {"item_ids": [], "caption_ids": []}
    assert run_filter(client, {"animal": "dog", "year": 2021}) == {
        "item_ids": [],
        "caption_ids": [],
    }


def test_filter_follows_status_changes(
    client: TestClient, catalogue: dict[str, dict[str, Any]]
) -> None:
    pending = catalogue["pending_cat"]["id"]
    client.patch(f"/items/{pending}", json={"status": "indexed"})
    assert pending in run_filter(client, {"animal": "cat"})["item_ids"]
    client.patch(f"/items/{pending}", json={"status": "failed"})
    assert pending not in run_filter(client, {"animal": "cat"})["item_ids"]


@pytest.mark.parametrize(
    "filters",
    [
        "animal=cat",
        ["animal", "cat"],
        {"animal": {"eq": "cat"}},
        {"animal": ["cat", ["dog"]]},
        {"animal": []},
        {"bad key!": "x"},
        {"year": 2**64},
    ],
)
def test_filter_invalid_shape(client: TestClient, filters: Any) -> None:
    create_indexed(client, attributes={"animal": "cat"})  # the collection exists
    response = client.post("/collections/photos/filter", json={"filters": filters})
    assert_problem(response, 422, "invalid_filter")


def test_filter_unknown_collection(client: TestClient) -> None:
    assert_problem(
        client.post("/collections/nowhere/filter", json={"filters": {}}),
        404,
        "collection_not_found",
    )
    assert_problem(
        client.post("/collections/Not%20Valid/filter", json={"filters": {}}),
        404,
        "collection_not_found",
    )


# --- collections -------------------------------------------------------------------------------


def test_collections_count_indexed_items(client: TestClient) -> None:
    assert client.get("/collections").json() == {"collections": []}
    create_indexed(client, collection="photos", image=png_bytes((1, 1, 1)), captions=["a", "b"])
    create_indexed(client, collection="photos", image=png_bytes((2, 2, 2)))
    create(client, collection="photos", image=png_bytes((3, 3, 3)), captions=["c"])  # pending
    create(client, collection="drafts")

    photos = client.get("/collections/photos").json()
    assert photos["items"] == 2
    assert photos["counts"] == {"pending": 1, "indexed": 2, "failed": 0}
    assert photos["captions"] == 2  # of indexed items only
    drafts = client.get("/collections/drafts").json()
    assert (drafts["items"], drafts["counts"]["pending"]) == (0, 1)
    listed = client.get("/collections").json()["collections"]
    assert [(c["name"], c["items"]) for c in listed] == [("drafts", 0), ("photos", 2)]
    assert listed[1] == photos
    assert_problem(client.get("/collections/missing"), 404, "collection_not_found")


# --- 404s --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/items/{id}", None),
        ("GET", "/items/{id}/image", None),
        ("PATCH", "/items/{id}", {"status": "indexed"}),
        ("DELETE", "/items/{id}", None),
    ],
)
def test_unknown_item_is_404(client: TestClient, method: str, path: str, body: Any) -> None:
    existing = create(client)
    for missing in (existing["id"] + 1, 2**63 + 5):
        response = client.request(method, path.format(id=missing), json=body)
        assert_problem(response, 404, "item_not_found")
    # The existing item was not touched by any of that.
    assert client.get(f"/items/{existing['id']}").json() == existing


# --- upload validation -------------------------------------------------------------------------


def test_image_too_large(client: TestClient, settings: MetadataSettings) -> None:
    big = png_bytes(size=(8, 8)) + b"\0" * settings.max_image_bytes
    assert_problem(upload(client, image=big), 413, "image_too_large")
    assert stored_files(settings) == []
    assert client.get("/collections").json() == {"collections": []}


def test_declared_length_too_large_is_refused_early(
    client: TestClient, settings: MetadataSettings
) -> None:
    huge = b"\0" * (settings.max_image_bytes + 2 * 1024 * 1024)
    # The invalid collection name would be a 422 if the form had been parsed: the 413 shows the
    # request was refused on its Content-Length alone.
    assert_problem(upload(client, collection="NOT VALID", image=huge), 413, "image_too_large")
    assert_problem(upload(client, collection="NOT VALID"), 422, "invalid_collection")


@pytest.mark.parametrize(
    "data",
    [
        b"definitely not an image",
        b"",
        png_bytes()[:40],  # truncated PNG
        png_bytes()[:-20] + b"\0" * 20,  # corrupted chunk: fails verify()
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n",  # a format we never open
    ],
    ids=["text", "empty", "truncated", "corrupted", "eps"],
)
def test_invalid_image(client: TestClient, settings: MetadataSettings, data: bytes) -> None:
    assert_problem(upload(client, image=data, content_type="image/png"), 422, "invalid_image")
    assert stored_files(settings) == []


def test_image_with_too_many_pixels(settings: MetadataSettings) -> None:
    limited = settings.model_copy(update={"max_image_pixels": 16})
    with TestClient(
        create_app(limited, token_keys=KEYS), headers=service_headers("metadata")
    ) as client:
        assert create(client, image=png_bytes(size=(4, 4)))["content_type"] == "image/png"
        assert_problem(upload(client, image=png_bytes(size=(4, 5))), 413, "image_too_large")


@pytest.mark.parametrize("name", ["Photos", "-photos", "a" * 65, "pho tos", "ph/otos", ""])
def test_invalid_collection_name(client: TestClient, name: str) -> None:
    response = upload(client, collection=name)
    expected = "validation_error" if name == "" else "invalid_collection"
    assert_problem(response, 422, expected)


def test_collection_name_edge_cases_accepted(client: TestClient) -> None:
    for name in ("a", "0", "a" * 64, "my_photos-2"):
        assert create(client, collection=name)["collection"] == name


@pytest.mark.parametrize(
    ("captions", "code"),
    [
        (["   "], "invalid_caption"),
        ([""], "invalid_caption"),
        (["fine", "\n\t"], "invalid_caption"),
        (["x" * 51], "invalid_caption"),
        (["c"] * 5, "too_many_captions"),
    ],
)
def test_invalid_captions(
    client: TestClient, settings: MetadataSettings, captions: list[str], code: str
) -> None:
    assert_problem(upload(client, captions=captions), 422, code)
    assert stored_files(settings) == []


def test_caption_limits_are_inclusive(client: TestClient) -> None:
    item = create(client, captions=["x" * 50, "b", "c", "d"])
    assert [c["text"] for c in item["captions"]] == ["x" * 50, "b", "c", "d"]


@pytest.mark.parametrize(
    "attributes",
    [
        "not json",
        "[1, 2]",
        '"text"',
        "42",
        '{"nested": {"a": 1}}',
        '{"list": [1, 2]}',
        '{"nan": NaN}',
        '{"bad key": 1}',
        json.dumps({"big": 2**64}),
    ],
)
def test_invalid_attributes(client: TestClient, attributes: str) -> None:
    assert_problem(upload(client, attributes=attributes), 422, "invalid_attributes")


def test_missing_fields_are_validation_errors(client: TestClient) -> None:
    response = client.post("/items", data={"collection": "photos"})
    assert_problem(response, 422, "validation_error")
    response = client.post("/items", files={"image": ("x.png", png_bytes(), "image/png")})
    assert_problem(response, 422, "validation_error")


def test_concurrent_uploads_to_a_new_collection(
    client: TestClient, settings: MetadataSettings
) -> None:
    # Several first writes to one collection at once: the implicit collection creation must not
    # race to an error; with the same bytes, exactly one item is made and the others are told.
    image = png_bytes((9, 9, 9))
    answers: list[Any] = []

    def worker(index: int) -> None:
        answers.append(upload(client, collection="burst", image=image, captions=[f"c{index}"]))
        answers.append(
            upload(client, collection="burst", image=png_bytes((index, 1, 1)), captions=["x"])
        )

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201] * 7 + [409] * 5, statuses
    duplicates = [a.json() for a in answers if a.status_code == 409]
    (same,) = [
        a.json()
        for a in answers
        if a.status_code == 201 and a.json()["captions"][0]["text"].startswith("c")
    ]
    assert {d["code"] for d in duplicates} == {"duplicate_pending"}
    assert {d["item_id"] for d in duplicates} == {same["id"]}
    assert len(stored_files(settings)) == 7
    listed = client.post("/collections/burst/filter", json={"filters": {}})
    assert listed.json() == {"item_ids": [], "caption_ids": []}  # all still pending
    (burst,) = client.get("/collections").json()["collections"]
    assert burst["name"] == "burst"
    assert burst["items"] == 0 and burst["counts"] == {"pending": 7, "indexed": 0, "failed": 0}


# --- service plumbing --------------------------------------------------------------------------


def test_health_readiness_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ready"}
    item = create(client, collection="metered")
    client.patch(f"/items/{item['id']}", json={"status": "indexed"})
    text = client.get("/metrics").text
    assert 'metadata_items{collection="metered",status="indexed"} 1.0' in text
    assert 'metadata_items{collection="metered",status="pending"} 0.0' in text
    client.delete(f"/items/{item['id']}")
    text = client.get("/metrics").text
    assert 'metadata_items{collection="metered",status="indexed"} 0.0' in text
