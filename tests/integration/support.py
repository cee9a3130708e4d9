"""Helpers of the end-to-end tests: tokens, item uploads, problem-body checks."""

from __future__ import annotations

import io
import json
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from crossmodal.stack import SERVICES, LocalStack

REDIS_URL = "redis://127.0.0.1:6379/0"
DEMO_USER = ("demo", "demo-password")
ALL_SCOPES = "search:text search:image items:read items:write admin"
SHAPES_COLLECTION = "shapes"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextmanager
def running_stack(
    data_dir: Path,
    model: str | Path,
    *,
    redis_url: str = REDIS_URL,
    extra_env: dict[str, str] | None = None,
) -> Iterator[LocalStack]:
    """The five services as processes on free loopback ports (the launcher of `make run`), one
    torch thread, and a fresh cache key space: cached pages of another run never leak in."""
    stack = LocalStack(
        data_dir,
        model=model,
        redis_url=redis_url,
        ports=dict(zip((s.name for s in SERVICES), free_ports(len(SERVICES)), strict=True)),
        extra_env={
            "GATEWAY_CACHE_PREFIX": f"test-{uuid.uuid4().hex[:12]}",
            "FEATURE_TORCH_THREADS": "1",
            # float32 on every processor (auto picks bf16 where the CPU has it natively): the
            # suite's rankings and scores must not depend on the machine it runs on.
            "FEATURE_RUNTIME": "torch",
            **(extra_env or {}),
        },
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@contextmanager
def gateway_client(stack: LocalStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url("gateway"), timeout=60.0) as client:
        yield client


def bearer(gateway: httpx.Client) -> dict[str, str]:
    """Authorization headers with a fresh token of the development user, every scope."""
    return {"Authorization": f"Bearer {get_token(gateway)}"}


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


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


def delete_collection(
    gateway: httpx.Client, auth: dict[str, str], name: str, *, timeout: float = 120.0
) -> dict[str, Any]:
    """DELETE the collection and follow its deletion until ``done`` (its name free again)."""
    response = gateway.delete(f"/collections/{name}", headers=auth)
    assert response.status_code == 202, response.text
    deletion: dict[str, Any] = response.json()
    deadline = time.monotonic() + timeout
    while deletion["state"] != "done":
        assert time.monotonic() < deadline, deletion
        time.sleep(0.1)
        followed = gateway.get(f"/deletions/{deletion['id']}", headers=auth)
        assert followed.status_code == 200, followed.text
        deletion = followed.json()
    return deletion
