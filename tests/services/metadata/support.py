"""Helpers of the metadata service tests: test images and upload/assert shortcuts."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image

from services.metadata.settings import MetadataSettings

PROBLEM = "application/problem+json"


_distinct = itertools.count(1)


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(color: tuple[int, int, int] = (10, 120, 240)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def upload(
    client: TestClient,
    collection: str = "photos",
    image: bytes | None = None,
    captions: list[str] | None = None,
    attributes: Any = None,
    filename: str = "upload.bin",
    content_type: str = "application/octet-stream",
    tags: list[str] | None = None,
    source_uri: str | None = None,
) -> Any:
    data: dict[str, Any] = {"collection": collection}
    if tags is not None:
        data["tag"] = tags
    if source_uri is not None:
        data["source_uri"] = source_uri
    if captions is not None:
        data["caption"] = captions
    if attributes is not None:
        data["attributes"] = attributes if isinstance(attributes, str) else json.dumps(attributes)
    if image is None:
        # A new image each time: the same bytes twice in one collection are a duplicate.
        n = next(_distinct)
        image = png_bytes((n % 256, n // 256 % 256, 7))
    files = {"image": (filename, image, content_type)}
    return client.post("/items", data=data, files=files)


def create(client: TestClient, **kwargs: Any) -> dict[str, Any]:
    response = upload(client, **kwargs)
    assert response.status_code == 201, response.text
    return response.json()


def create_indexed(client: TestClient, **kwargs: Any) -> dict[str, Any]:
    item = create(client, **kwargs)
    response = client.patch(f"/items/{item['id']}", json={"status": "indexed"})
    assert response.status_code == 200, response.text
    return response.json()


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code, body
    assert body["detail"]
    return body


def stored_files(settings: MetadataSettings) -> list[Path]:
    """The stored originals (thumbnails live under thumbs/)."""
    root = Path(settings.image_dir)
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "thumbs"
    )


def stored_thumbnails(settings: MetadataSettings) -> list[Path]:
    return sorted(p for p in (Path(settings.image_dir) / "thumbs").rglob("*") if p.is_file())
