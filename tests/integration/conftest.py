"""The whole stack as real processes on free loopback ports, with the real Redis on 127.0.0.1.

One stack serves the module; tests that restart services run last in their module.
"""

from __future__ import annotations

import io
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from crossmodal.demo.shapes import demo_collection
from crossmodal.stack import SERVICES, LocalStack

REDIS_URL = "redis://127.0.0.1:6379/0"
DEMO_USER = ("demo", "demo-password")
ALL_SCOPES = "search:text search:image items:read items:write admin"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="session")
def stack(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    data_dir = tmp_path_factory.mktemp("stack")
    ports = dict(zip((s.name for s in SERVICES), free_ports(len(SERVICES)), strict=True))
    stack = LocalStack(
        data_dir,
        model=demo_model_dir,
        redis_url=REDIS_URL,
        ports=ports,
        # A fresh key space per run: cached pages of an earlier run can never leak in.
        extra_env={
            "GATEWAY_CACHE_PREFIX": f"test-{uuid.uuid4().hex[:12]}",
            "FEATURE_TORCH_THREADS": "1",
        },
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def gateway(stack: LocalStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url("gateway"), timeout=60.0) as client:
        yield client


def get_token(gateway: httpx.Client, scope: str = ALL_SCOPES) -> str:
    response = gateway.post(
        "/auth/token",
        data={
            "grant_type": "password",
            "username": DEMO_USER[0],
            "password": DEMO_USER[1],
            "scope": scope,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


@pytest.fixture(scope="session")
def token(gateway: httpx.Client) -> str:
    return get_token(gateway)


@pytest.fixture(scope="session")
def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def add_item(
    gateway: httpx.Client,
    auth: dict[str, str],
    image: bytes,
    *,
    collection: str,
    captions: list[str],
    attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {"collection": collection, "caption": captions}
    if attributes is not None:
        data["attributes"] = json.dumps(attributes)
    response = gateway.post(
        "/items", headers=auth, data=data, files={"image": ("item.png", image, "image/png")}
    )
    assert response.status_code == 201, response.text
    return response.json()


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code, body
    assert body["detail"]
    return body


SHAPES_COLLECTION = "shapes"


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def shapes(gateway: httpx.Client, auth: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The demo shapes indexed through the gateway: canonical caption → item."""
    items: dict[str, dict[str, Any]] = {}
    for demo in demo_collection():
        item = add_item(
            gateway,
            auth,
            png_bytes(demo.image),
            collection=SHAPES_COLLECTION,
            captions=demo.captions,
            attributes={"colour": demo.colour, "shape": demo.shape},
        )
        assert item["status"] == "indexed"
        items[demo.caption] = item
    return items
