"""``crossmodal index``, ``search`` and ``reconcile`` end to end against the real stack (every
service a process; see conftest.py). Each test uses collections of its own."""

from __future__ import annotations

import io
import json
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from typer.testing import CliRunner

from crossmodal.cli import app
from crossmodal.client import GatewayClient
from crossmodal.demo.shapes import render
from crossmodal.stack import LocalStack
from tests.integration.support import DEMO_USER, png_bytes

runner = CliRunner()
SHAPES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("black", "star")]


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("CROSSMODAL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("CROSSMODAL_TOKEN", raising=False)
    return {}


def crossmodal(*args: str, env: dict[str, str] | None = None) -> Any:
    result = runner.invoke(app, list(args), env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def login(stack: LocalStack) -> None:
    result = crossmodal(
        "login",
        "--gateway",
        stack.url("gateway"),
        "--username",
        DEMO_USER[0],
        "--password",
        DEMO_USER[1],
    )
    assert result.exit_code == 0, result.output


def metadata_items(stack: LocalStack, collection: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{stack.url('metadata')}/collections/{collection}/items",
        headers=stack.service_headers("metadata"),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()["items"]


def test_index_a_folder_then_search_and_resume(
    stack: LocalStack, cli_env: dict[str, str], tmp_path: Path
) -> None:
    gateway = stack.url("gateway")
    folder = tmp_path / "shapes"
    (folder / "more").mkdir(parents=True)
    for i, (colour, shape) in enumerate(SHAPES):
        where = folder / "more" if i % 2 else folder
        (where / f"{colour}-{shape}.png").write_bytes(png_bytes(render(colour, shape)))
        (where / f"{colour}-{shape}.txt").write_text(f"a {colour} {shape}\n")
    (folder / "more" / "black-star.json").write_text(
        json.dumps({"captions": ["a black star"], "attributes": {"points": 5}})
    )
    # The same bytes under a second name, first in path order and without a caption: one item,
    # which the red circle's record, coming second, gives its caption.
    (folder / "copy.png").write_bytes((folder / "red-circle.png").read_bytes())
    journal = tmp_path / "journal.jsonl"
    login(stack)
    index = ["index", str(folder), "-c", "ingest-e2e", "--gateway", gateway]
    index += ["--journal", str(journal), "--concurrency", "2", "--batch-size", "2"]

    result = crossmodal(*index)
    assert result.exit_code == 0, result.output
    assert "4 indexed, 1 merged, 0 already there, 0 failed" in result.output
    assert len(metadata_items(stack, "ingest-e2e")) == 4
    result = crossmodal(
        "search", "a red circle", "-c", "ingest-e2e", "--gateway", gateway, "--json"
    )
    best = json.loads(result.output)["results"][0]["item"]
    assert [c["text"] for c in best["captions"]] == ["a red circle"]

    result = crossmodal(
        "search", "a green triangle", "-c", "ingest-e2e", "--gateway", gateway, "--json"
    )
    assert result.exit_code == 0, result.output
    best = json.loads(result.output)["results"][0]["item"]
    assert [c["text"] for c in best["captions"]] == ["a green triangle"]
    result = crossmodal(
        "search", "-c", "ingest-e2e", "--image", str(folder / "more" / "black-star.png"),
        "--gateway", gateway, "--json",
    )  # fmt: skip
    best = json.loads(result.output)["results"][0]["item"]
    assert best["attributes"] == {"points": 5}

    # Again: everything is in the journal, nothing is sent.
    result = crossmodal(*index)
    assert result.exit_code == 0, result.output
    assert (
        "0 indexed, 0 merged, 0 already there, 0 failed, 5 done by an earlier run" in result.output
    )
    # Without the journal, the gateway's 409 duplicate_item answers keep it idempotent.
    result = crossmodal(*index, "--restart")
    assert result.exit_code == 0, result.output
    assert "0 indexed, 0 merged, 5 already there" in result.output
    assert len(metadata_items(stack, "ingest-e2e")) == 4


class _Images(BaseHTTPRequestHandler):
    images: ClassVar[dict[str, bytes]] = {}

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:
        data = self.images.get(self.path)
        self.send_response(200 if data else 404)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")


@pytest.fixture
def image_server() -> Iterator[str]:
    _Images.images = {
        f"/{colour}-{shape}.png": png_bytes(render(colour, shape, rng=random.Random(7)))
        for colour, shape in SHAPES[:2]
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_index_a_manifest_of_urls_behind_the_ssrf_guard(
    stack: LocalStack, cli_env: dict[str, str], tmp_path: Path, image_server: str
) -> None:
    manifest = tmp_path / "urls.jsonl"
    manifest.write_text(
        "\n".join(
            json.dumps({"url": f"{image_server}{path}", "caption": path.strip("/")})
            for path in _Images.images
        )
    )
    login(stack)
    index = ["index", str(manifest), "-c", "ingest-urls", "--gateway", stack.url("gateway")]
    index += ["--journal", str(tmp_path / "j.jsonl")]
    result = crossmodal(*index)
    assert result.exit_code == 1, result.output
    assert "0 indexed, 0 merged, 0 already there, 2 failed" in result.output
    assert "loopback" in result.output

    result = crossmodal(*index, "--allow-network", "127.0.0.1/32")
    assert result.exit_code == 0, result.output
    assert "2 indexed" in result.output
    assert len(metadata_items(stack, "ingest-urls")) == 2


def png_of(colour: str, shape: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    render(colour, shape, rng=random.Random(seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def reconcile(stack: LocalStack, collection: str, *extra: str) -> tuple[int, dict[str, Any]]:
    result = crossmodal(
        "reconcile",
        collection,
        "--metadata-url",
        stack.url("metadata"),
        "--retrieval-url",
        stack.url("retrieval"),
        "--auth-url",
        stack.url("auth"),
        "--json",
        *extra,
        # The stack's own secret for the reconcile client; the development default is refused.
        env={"CROSSMODAL_RECONCILE_CLIENT_SECRET": stack.client_secrets["reconcile"]},
    )
    return result.exit_code, json.loads(result.output)


def test_reconcile_needs_the_reconcile_client_s_secret(
    stack: LocalStack, cli_env: dict[str, str]
) -> None:
    result = crossmodal(
        "reconcile",
        "drift",
        "--metadata-url",
        stack.url("metadata"),
        "--retrieval-url",
        stack.url("retrieval"),
        "--auth-url",
        stack.url("auth"),
        env={"CROSSMODAL_RECONCILE_CLIENT_SECRET": "not-this-stack-s-secret"},
    )
    assert result.exit_code == 1
    assert "refused the reconcile client" in result.output and "invalid_client" in result.output


def test_reconcile_finds_and_repairs_drift(stack: LocalStack, token: str) -> None:
    collection = "drift"
    # Straight to the internal services, as the operator tools do: with their service tokens.
    retrieval = httpx.Client(
        base_url=stack.url("retrieval"), headers=stack.service_headers("retrieval"), timeout=30
    )
    metadata = httpx.Client(
        base_url=stack.url("metadata"), headers=stack.service_headers("metadata"), timeout=30
    )
    with GatewayClient(stack.url("gateway"), token=token) as client:
        lost, failed, fine = (
            client.add_item(collection, png_of(c, s, 3), captions=[f"a {c} {s}"])
            for c, s in SHAPES[:3]
        )
        # Drift, three ways. The retrieval volume lost an item's image vector:
        retrieval.post(
            f"/collections/{collection}/delete", json={"ids": [lost["id"]], "modality": "image"}
        ).raise_for_status()
        # an item was marked failed but its vectors could not be removed:
        metadata.patch(
            f"/items/{failed['id']}", json={"status": "failed", "error": "test"}
        ).raise_for_status()
        # and an upload died after metadata stored it (pending, no vectors):
        stuck = metadata.post(
            "/items",
            data={"collection": collection, "caption": ["a black star"]},
            files={"image": ("s.png", png_of("black", "star", 3), "image/png")},
        ).json()

        code, found = reconcile(stack, collection, "--stale-after", "0")
        assert code == 1
        assert found["metadata"] == {"pending": 1, "indexed": 2, "failed": 1}
        assert found["missing"] == [lost["id"]]
        assert found["stale"] == [failed["id"]]
        assert found["stuck"] == [stuck["id"]]
        assert found["failed"] == [failed["id"]]
        assert found["orphans"] == {"image": 0, "text": 0}

        prefix = stack.services["gateway"].env["GATEWAY_CACHE_PREFIX"]
        query = {"query": "a red circle", "collection": collection, "top_k": 4}
        before = client.search_text(**query)
        assert lost["id"] not in [r["item_id"] for r in before["results"]]

        code, repaired = reconcile(
            stack,
            collection,
            "--stale-after",
            "0",
            "--repair",
            "--feature-url",
            stack.url("feature"),
            "--redis-url",
            "redis://127.0.0.1:6379/0",
            "--cache-prefix",
            prefix,
        )
        assert code == 0, repaired
        assert sorted(repaired["repair"]["reindexed"]) == sorted([lost["id"], stuck["id"]])
        assert repaired["repair"]["vectors_deleted"] == 2  # the failed item's image and caption
        assert repaired["repair"]["errors"] == []

        code, after = reconcile(stack, collection, "--stale-after", "0")
        assert code == 0 and after["clean"], after
        assert after["metadata"] == {"pending": 0, "indexed": 3, "failed": 1}
        # The cache was invalidated: the repaired item is found at once.
        results = client.search_text(**query)["results"]
        assert results[0]["item_id"] == lost["id"]
        ids = {r["item_id"] for r in results}
        assert stuck["id"] in ids and failed["id"] not in ids and fine["id"] in ids

        # Failed items come back on request, from their stored image.
        code, retried = reconcile(
            stack, collection, "--repair", "--retry-failed", "--feature-url", stack.url("feature")
        )
        assert code == 0 and retried["repair"]["reindexed"] == [failed["id"]]
        assert metadata.get(f"/items/{failed['id']}").json()["status"] == "indexed"
    retrieval.close()
    metadata.close()


def test_reconcile_counts_orphan_vectors(stack: LocalStack, token: str) -> None:
    collection = "orphans"
    with GatewayClient(stack.url("gateway"), token=token) as client:
        kept = client.add_item(collection, png_of("pink", "circle", 5), captions=["a pink circle"])
        gone = client.add_item(collection, png_of("pink", "star", 5), captions=["a pink star"])
    # Deleted from metadata while retrieval was unreachable: its vectors stay behind.
    httpx.delete(
        f"{stack.url('metadata')}/items/{gone['id']}",
        headers=stack.service_headers("metadata"),
        timeout=10,
    ).raise_for_status()
    code, found = reconcile(stack, collection)
    assert code == 1
    assert found["orphans"] == {"image": 1, "text": 1}
    assert found["missing"] == [] and found["metadata"]["indexed"] == 1
    if found["method"] == "listing":  # retrieval can list ids: the orphans are removed
        code, repaired = reconcile(stack, collection, "--repair")
        assert code == 0 and repaired["repair"]["vectors_deleted"] == 2
        assert reconcile(stack, collection)[1]["clean"]
    assert kept["status"] == "indexed"
