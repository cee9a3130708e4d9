"""A long ``crossmodal index`` run outlives its access token: against a stack whose tokens live
five seconds, the run renews its token with the saved refresh token and indexes everything; a
login that cannot be renewed stops the run at once with the way out."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from crossmodal.client import Token, TokenStore
from crossmodal.demo.shapes import render
from crossmodal.stack import LocalStack
from tests.integration.support import png_bytes, running_stack
from tests.integration.test_ingest_cli import crossmodal, login, metadata_items

TOKEN_SECONDS = 5
IMAGES = 12
DELAY = 1.0  # per image download: two at a time, the run lasts at least IMAGES * DELAY / 2 s


@pytest.fixture(scope="module")
def short_stack(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with running_stack(
        tmp_path_factory.mktemp("short-token-stack"),
        demo_model_dir,
        extra_env={"AUTH_ACCESS_TOKEN_TTL_SECONDS": str(TOKEN_SECONDS)},
    ) as stack:
        yield stack


class _SlowImages(BaseHTTPRequestHandler):
    images: ClassVar[dict[str, bytes]] = {}

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:
        time.sleep(DELAY)
        data = self.images.get(self.path, b"")
        self.send_response(200 if data else 404)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    rng = random.Random(11)
    _SlowImages.images = {
        f"/{n}.png": png_bytes(render(rng.choice(["red", "blue"]), "circle", rng=rng))
        for n in range(IMAGES)
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowImages)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    path = tmp_path_factory.mktemp("manifest") / "images.jsonl"
    path.write_text(
        "".join(
            json.dumps({"url": f"{base}{name}", "captions": [f"image {name}"]}) + "\n"
            for name in _SlowImages.images
        )
    )
    try:
        yield path
    finally:
        server.shutdown()


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROSSMODAL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("CROSSMODAL_TOKEN", raising=False)


def index(stack: LocalStack, manifest: Path, collection: str, journal: Path) -> Any:
    return crossmodal(
        "index", str(manifest), "-c", collection, "--gateway", stack.url("gateway"),
        "--journal", str(journal), "--allow-private-urls", "--concurrency", "2",
        "--batch-size", "4", "--quiet",
    )  # fmt: skip


def test_an_ingestion_renews_its_token_and_indexes_everything(
    short_stack: LocalStack, manifest: Path, cli_env: None, tmp_path: Path
) -> None:
    login(short_stack)
    store = TokenStore()
    first = store.load(short_stack.url("gateway"))
    assert first is not None and first.refresh_token and first.lifetime == TOKEN_SECONDS

    started = time.monotonic()
    result = index(short_stack, manifest, "renewed", tmp_path / "journal.jsonl")
    took = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert f"{IMAGES} indexed, 0 merged, 0 already there, 0 failed" in result.output
    assert took > TOKEN_SECONDS  # the run did outlive the token it started with
    assert len(metadata_items(short_stack, "renewed")) == IMAGES
    # Renewed, and the rotated pair saved: the login still works for the next command.
    last = store.load(short_stack.url("gateway"))
    assert last is not None and last.refresh_token != first.refresh_token
    listed = crossmodal("collections", "--gateway", short_stack.url("gateway"))
    assert listed.exit_code == 0 and "renewed" in listed.output


def test_a_login_that_cannot_be_renewed_stops_the_run(
    short_stack: LocalStack, manifest: Path, cli_env: None, tmp_path: Path
) -> None:
    gateway = short_stack.url("gateway")
    # A saved login the gateway no longer accepts, with a refresh token auth does not know.
    TokenStore().save(gateway, Token("not-a-token", time.time() + 600, "cmrt_spent", 900.0))
    journal = tmp_path / "journal.jsonl"
    result = index(short_stack, manifest, "stopped", journal)
    assert result.exit_code == 1, result.output
    assert "crossmodal login" in result.output
    assert "Run the same command again to retry" not in result.output
    # Stopped at once: only the first batch (four records) was tried.
    attempted = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    assert len(attempted) <= 4, attempted
    nothing = httpx.get(
        f"{short_stack.url('metadata')}/collections/stopped/items",
        headers=short_stack.service_headers("metadata"),
        timeout=10,
    )
    assert nothing.status_code == 404  # no upload went through: not even the collection exists
    # After a login, the same command finishes the job.
    login(short_stack)
    result = index(short_stack, manifest, "stopped", journal)
    assert result.exit_code == 0, result.output
    assert len(metadata_items(short_stack, "stopped")) == IMAGES
