"""The stack repairs itself: against real processes, uploads cut short by kill -9 of the
retrieval service and of the gateway, and one refused while retrieval is stopped, leave items
``failed`` and ``pending``; the gateway's background drift repair (shared/reconcile.py, run
every second here) indexes them all again and its drift metric returns to 0, with nobody
running ``crossmodal reconcile``."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from crossmodal.stack import LocalStack
from tests.integration.support import bearer, gateway_client, png_bytes, running_stack

COLLECTION = "self-repair"


@pytest.fixture(scope="module")
def repair_stack(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with running_stack(
        tmp_path_factory.mktemp("self-repair-stack"),
        demo_model_dir,
        extra_env={
            "GATEWAY_MAINTENANCE_INTERVAL_SECONDS": "0.5",
            "GATEWAY_RECONCILE_INTERVAL_SECONDS": "1",
            "GATEWAY_RECONCILE_STUCK_SECONDS": "3",
        },
    ) as stack:
        yield stack


def _image(n: int) -> bytes:
    rng = np.random.default_rng(n)
    return png_bytes(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))


class Writers:
    """Threads uploading distinct images until stopped; what they were answered."""

    def __init__(self, stack: LocalStack, threads: int = 4) -> None:
        self.stack = stack
        self.statuses: list[int | str] = []
        self._next = iter(range(1_000_000))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        with gateway_client(self.stack) as gateway:
            auth = bearer(gateway)
            while not self._stop.is_set():
                with self._lock:
                    n = next(self._next)
                try:
                    response = gateway.post(
                        "/items",
                        headers=auth,
                        data={"collection": COLLECTION, "caption": [f"picture {n}"]},
                        files={"image": ("i.png", _image(n), "image/png")},
                        timeout=30,
                    )
                    status: int | str = response.status_code
                except httpx.HTTPError as exc:  # the gateway killed under it
                    status = type(exc).__name__
                    time.sleep(0.2)
                with self._lock:
                    self.statuses.append(status)

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def item_states(stack: LocalStack) -> dict[str, int]:
    response = httpx.get(
        f"{stack.url('metadata')}/collections/{COLLECTION}/items",
        params={"limit": 10_000},
        headers=stack.service_headers("metadata"),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    counts: dict[str, int] = {}
    for item in response.json()["items"]:
        counts[item["status"]] = counts.get(item["status"], 0) + 1
    return counts


def drift(stack: LocalStack) -> dict[str, float]:
    text = httpx.get(f"{stack.url('gateway')}/metrics", timeout=10).text
    pattern = rf'^crossmodal_reconcile_drift{{collection="{COLLECTION}",modality="(\w+)",side="(\w+)"}} (\S+)$'
    return {f"{m[1]}/{m[2]}": float(m[3]) for m in re.finditer(pattern, text, re.MULTILINE)}


def wait_for(what: str, check: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_items_a_crash_left_behind_are_indexed_by_the_stack_itself(
    repair_stack: LocalStack,
) -> None:
    stack = repair_stack
    with Writers(stack) as writers:
        wait_for("uploads under way", lambda: len(writers.statuses) >= 8)
        stack.services["retrieval"].stop(kill=True)
        time.sleep(1.0)  # uploads meet a dead retrieval: their items end failed
        stack.restart("retrieval")
        wait_for("uploads again", lambda: writers.statuses[-4:].count(201) >= 2)
        stack.services["gateway"].stop(kill=True)  # uploads in its hands stay pending
        time.sleep(0.5)
        stack.restart("gateway")
        wait_for("uploads after the restart", lambda: writers.statuses[-4:].count(201) >= 2)
    # And one refused outright while retrieval is stopped: a failed item for certain.
    stack.services["retrieval"].stop()
    with gateway_client(stack) as gateway:
        refused = gateway.post(
            "/items",
            headers=bearer(gateway),
            data={"collection": COLLECTION, "caption": ["refused"]},
            files={"image": ("i.png", _image(10_000_000), "image/png")},
        )
    assert refused.status_code == 503, refused.text
    assert item_states(stack).get("failed", 0) >= 1
    stack.restart("retrieval")

    # Nobody runs reconcile: the gateway's background repair brings every item to indexed...
    wait_for("every item indexed", lambda: set(item_states(stack)) == {"indexed"})
    indexed = item_states(stack)["indexed"]
    # ... with its vectors, and the drift metric back to 0.
    wait_for("drift 0", lambda: drift(stack) and not any(drift(stack).values()))
    vectors = httpx.get(
        f"{stack.url('retrieval')}/collections/{COLLECTION}",
        headers=stack.service_headers("retrieval"),
        timeout=10,
    ).json()
    assert vectors["counts"]["image"] == indexed
    assert 201 in writers.statuses and any(s != 201 for s in writers.statuses), writers.statuses
