"""The whole stack as real processes on free loopback ports, with the real Redis on 127.0.0.1.

One stack serves the whole session; the test that restarts services runs last.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from crossmodal.demo.shapes import demo_collection
from crossmodal.stack import LocalStack
from tests.integration.support import (
    SHAPES_COLLECTION,
    add_item,
    gateway_client,
    get_token,
    png_bytes,
    running_stack,
)


@pytest.fixture(scope="session")
def stack(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with running_stack(tmp_path_factory.mktemp("stack"), demo_model_dir) as stack:
        yield stack


@pytest.fixture(scope="session")
def gateway(stack: LocalStack) -> Iterator[httpx.Client]:
    with gateway_client(stack) as client:
        yield client


@pytest.fixture(scope="session")
def token(gateway: httpx.Client) -> str:
    return get_token(gateway)


@pytest.fixture(scope="session")
def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


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
