"""The ``crossmodal`` commands against stand-in gateways (the real stack is in
tests/integration/test_ingest_cli.py): tokens, collections, search, index and run's options."""

from __future__ import annotations

import hashlib
import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import crossmodal.cli as cli
from crossmodal.client import GatewayClient, Token, TokenStore
from services.metadata.app import create_app
from services.metadata.settings import MetadataSettings
from tests.crossmodal.test_ingest_pipeline import FakeGateway, png
from tests.service_tokens import KEYS, service_headers

GATEWAY = "http://gateway.test"


class StubGateway:
    """Token, collections and search endpoints with canned answers; records what it was sent."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.collections_route = True
        self.extra_collection: dict[str, Any] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/auth/token":
            form = dict(x.split("=") for x in request.content.decode().split("&"))
            if form.get("password") != "right":
                return httpx.Response(401, json={"code": "invalid_grant", "detail": "wrong"})
            return httpx.Response(
                200, json={"access_token": "tok-123", "token_type": "Bearer", "expires_in": 900}
            )
        if request.headers.get("authorization") != "Bearer tok-123":
            return httpx.Response(401, json={"code": "invalid_token", "detail": "who are you"})
        if path.startswith("/collections") and not self.collections_route:
            return httpx.Response(404, json={"code": "not_found", "detail": "Not Found"})
        if path == "/collections":
            extra = [self.extra_collection] if self.extra_collection else []
            return httpx.Response(200, json={"collections": [COLLECTION, *extra]})
        if path == "/collections/shop":
            return httpx.Response(200, json=COLLECTION)
        if path == "/search/text":
            return httpx.Response(200, json=search_answer(json.loads(request.content)))
        if path == "/search/image":
            return httpx.Response(200, json=search_answer({"target": "image"}))
        return httpx.Response(404, json={"code": "not_found", "detail": "Not Found"})


COLLECTION = {
    "name": "shop",
    "items": 3,
    "counts": {"pending": 1, "indexed": 3, "failed": 2},
    "captions": 6,
    "model_id": "tiny-clip",
    "index": {"factory": "HNSW32"},
}


def search_answer(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "collection": "shop",
        "target": body.get("target", "image"),
        "top_k": 1,
        "model_id": "tiny-clip",
        "results": [
            {
                "rank": 1,
                "score": 0.87654,
                "item_id": 42,
                "caption": None,
                "item": {
                    "id": 42,
                    "captions": [{"id": 1, "text": "a red shirt"}],
                    "attributes": {"sku": "RS-1"},
                },
            }
        ],
    }


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "config"
    monkeypatch.setenv("CROSSMODAL_CONFIG_DIR", str(folder))
    monkeypatch.delenv("CROSSMODAL_TOKEN", raising=False)
    return folder


def use_gateway(monkeypatch: pytest.MonkeyPatch, handler: Any) -> None:
    def factory(base_url: str, **kwargs: Any) -> GatewayClient:
        assert base_url == GATEWAY
        return GatewayClient(base_url, transport=httpx.MockTransport(handler), **kwargs)

    monkeypatch.setattr(cli, "GatewayClient", factory)


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch, config: Path) -> StubGateway:
    gateway = StubGateway()
    use_gateway(monkeypatch, gateway)
    return gateway


runner = CliRunner()


def invoke(*args: str, **env: str) -> Any:
    return runner.invoke(cli.app, list(args), env=env or None)


def test_login_saves_a_private_token_used_by_later_commands(
    stub: StubGateway, config: Path
) -> None:
    failed = invoke("login", "--gateway", GATEWAY, "--username", "demo", "--password", "wrong")
    assert failed.exit_code == 1 and "invalid_grant" in failed.output

    result = invoke("login", "--gateway", GATEWAY, "--username", "demo", "--password", "right")
    assert result.exit_code == 0, result.output
    saved = config / "credentials.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())[GATEWAY]["access_token"] == "tok-123"

    result = invoke("search", "red shirt", "-c", "shop", "--gateway", GATEWAY, "--json")
    assert result.exit_code == 0, result.output
    assert stub.requests[-1].headers["authorization"] == "Bearer tok-123"

    assert invoke("logout", "--gateway", GATEWAY).exit_code == 0
    result = invoke("search", "red shirt", "-c", "shop", "--gateway", GATEWAY)
    assert result.exit_code == 1 and "crossmodal login" in result.output


def test_token_from_the_environment_and_expired_tokens(stub: StubGateway, config: Path) -> None:
    result = invoke(
        "search", "x", "-c", "shop", "--gateway", GATEWAY, "--json", CROSSMODAL_TOKEN="tok-123"
    )
    assert result.exit_code == 0, result.output
    TokenStore().save(GATEWAY, Token("tok-123", time.time() - 10))
    result = invoke("search", "x", "-c", "shop", "--gateway", GATEWAY)
    assert result.exit_code == 1 and "expired" in result.output


def test_search_output(stub: StubGateway, config: Path) -> None:
    TokenStore().save(GATEWAY, Token("tok-123", None))
    result = invoke("search", "a red shirt", "-c", "shop", "--gateway", GATEWAY)
    assert result.exit_code == 0, result.output
    assert "a red shirt" in result.output and "0.8765" in result.output and "RS-1" in result.output

    result = invoke(
        "search",
        "shirt",
        "-c",
        "shop",
        "--gateway",
        GATEWAY,
        "--mode",
        "hybrid",
        "--target",
        "text",
        "--filters",
        '{"$tags": "sale"}',
        "--json",
    )
    assert result.exit_code == 0, result.output
    sent = json.loads(stub.requests[-1].content)
    assert sent == {
        "query": "shirt",
        "collection": "shop",
        "top_k": 10,
        "target": "text",
        "filters": {"$tags": "sale"},
        "mode": "hybrid",
    }
    assert json.loads(result.output)["results"][0]["item_id"] == 42

    # By default no "mode" is sent, so gateways without hybrid search accept the request, and
    # no target: the API's default applies (images for a text query).
    invoke("search", "shirt", "-c", "shop", "--gateway", GATEWAY)
    assert json.loads(stub.requests[-1].content).keys() == {"query", "collection", "top_k"}

    query = Path(config.parent / "q.png")
    query.write_bytes(png(1))
    result = invoke("search", "-c", "shop", "--image", str(query), "--gateway", GATEWAY)
    assert result.exit_code == 0, result.output
    assert stub.requests[-1].url.path == "/search/image"
    # ... and captions for an image query, as POST /search/image answers without a target.
    assert b'name="target"' not in stub.requests[-1].content
    invoke("search", "-c", "shop", "--image", str(query), "--target", "image", "--gateway", GATEWAY)
    assert b'name="target"\r\n\r\nimage\r\n' in stub.requests[-1].content
    assert invoke("search", "-c", "shop", "--gateway", GATEWAY).exit_code == 1
    assert (
        invoke("search", "x", "-c", "shop", "--filters", "{bad", "--gateway", GATEWAY).exit_code
        == 1
    )


def test_collections_commands(stub: StubGateway, config: Path) -> None:
    TokenStore().save(GATEWAY, Token("tok-123", None))
    result = invoke("collections", "--gateway", GATEWAY)
    assert result.exit_code == 0, result.output
    assert "shop" in result.output and "HNSW32" in result.output and "tiny-clip" in result.output
    result = invoke("collections", "show", "shop", "--gateway", GATEWAY)
    assert json.loads(result.output) == COLLECTION
    result = invoke("collections", "list", "--gateway", GATEWAY, "--json")
    assert json.loads(result.output) == {"collections": [COLLECTION]}

    # Not on a terminal (here: captured), a table is not wrapped: long names stay whole.
    long_name = "a-collection-with-a-long-name-" * 4
    stub.extra_collection = {**COLLECTION, "name": long_name}
    result = invoke("collections", "--gateway", GATEWAY)
    assert any(long_name in line for line in result.output.splitlines()), result.output

    stub.collections_route = False  # a gateway without the collections endpoints yet
    result = invoke("collections", "list", "--gateway", GATEWAY)
    assert result.exit_code == 1 and "not_found" in result.output


@pytest.fixture
def metadata_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: Path
) -> Iterator[FakeGateway]:
    settings = MetadataSettings(
        database_url=f"sqlite:///{tmp_path / 'meta.db'}", image_dir=tmp_path / "stored"
    )
    with TestClient(
        create_app(settings, token_keys=KEYS), headers=service_headers("metadata")
    ) as metadata:
        gateway = FakeGateway(metadata)
        use_gateway(monkeypatch, gateway)
        yield gateway


def test_index_a_folder_resumes_and_reports_failures(
    metadata_gateway: FakeGateway, tmp_path: Path
) -> None:
    folder = tmp_path / "pictures"
    (folder / "sub").mkdir(parents=True)
    for n in range(5):
        (folder / ("sub" if n % 2 else ".") / f"p{n}.png").write_bytes(png(n))
    (folder / "p0.txt").write_text("the first picture\n")
    (folder / "p4.png").write_bytes(b"this is not a png")
    journal = tmp_path / "journal.jsonl"
    args = ["index", str(folder), "-c", "pics", "--gateway", GATEWAY, "--token", "t"]
    args += ["--journal", str(journal), "--concurrency", "2", "--tag", "holiday"]

    result = invoke(*args)
    assert result.exit_code == 1, result.output  # one failure
    assert "4 indexed, 0 merged, 0 already there, 1 failed" in result.output
    assert "p4.png" in result.output and "invalid_image" in result.output
    states = metadata_gateway.metadata.get("/collections/pics/items").json()["items"]
    assert len(states) == 4
    items = [metadata_gateway.metadata.get(f"/items/{s['id']}").json() for s in states]
    (first,) = [i for i in items if i["image_sha256"] == hashlib.sha256(png(0)).hexdigest()]
    assert [c["text"] for c in first["captions"]] == ["the first picture"]
    assert {tuple(i["tags"]) for i in items} == {("holiday",)}
    # A local file's path on the indexing machine is not an origin a reader could follow.
    assert {i["source_uri"] for i in items} == {None}

    (folder / "p4.png").write_bytes(png(4))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert (
        "1 indexed, 0 merged, 0 already there, 0 failed, 4 done by an earlier run" in result.output
    )

    result = invoke(*args, "--restart")  # journal dropped: the server's answers keep it idempotent
    assert result.exit_code == 0, result.output
    assert "0 indexed, 0 merged, 5 already there" in result.output
    assert len(metadata_gateway.metadata.get("/collections/pics/items").json()["items"]) == 5


def test_index_merges_duplicates_and_names_the_attributes_kept(
    metadata_gateway: FakeGateway, tmp_path: Path
) -> None:
    (tmp_path / "stamp.png").write_bytes(png(7))
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "stamp.png").write_bytes(png(7))
    manifest = tmp_path / "stamps.jsonl"
    lines = [
        {"image": "stamp.png", "caption": "a blue stamp", "attributes": {"year": 1901}},
        {"image": "copy/stamp.png", "caption": "a stamp, mint", "attributes": {"year": 1902}},
        {"image": "stamp.png", "caption": "the same stamp, used"},
    ]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["index", str(manifest), "-c", "stamps", "--gateway", GATEWAY, "--token", "t"]
    args += ["--journal", str(tmp_path / "journal.jsonl")]

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "1 indexed, 2 merged, 0 already there, 0 failed" in result.output
    assert "(3 in the input)" in result.output
    assert "attributes kept" in result.output and "year: kept 1901, not 1902" in result.output
    (state,) = metadata_gateway.metadata.get("/collections/stamps/items").json()["items"]
    item = metadata_gateway.metadata.get(f"/items/{state['id']}").json()
    assert [c["text"] for c in item["captions"]] == [
        "a blue stamp",
        "a stamp, mint",
        "the same stamp, used",
    ]

    result = invoke(*args, "--restart")
    assert result.exit_code == 0, result.output
    assert "0 indexed, 0 merged, 3 already there, 0 failed" in result.output


def test_index_input_errors(metadata_gateway: FakeGateway, tmp_path: Path) -> None:
    result = invoke("index", str(tmp_path / "none"), "-c", "x", "--token", "t")
    assert result.exit_code == 1 and "does not exist" in result.output
    result = invoke("index", str(tmp_path), "-c", "x", "--token", "t", "--format", "parquet")
    assert result.exit_code == 1 and "unknown format" in result.output
    other = tmp_path / "j.jsonl"
    other.write_text(json.dumps({"journal": 1, "collection": "else"}) + "\n")
    result = invoke(
        "index",
        str(tmp_path),
        "-c",
        "x",
        "--token",
        "t",
        "--journal",
        str(other),
        "--gateway",
        GATEWAY,
    )
    assert result.exit_code == 1 and "'else'" in result.output


def test_index_refuses_manifest_paths_outside_its_folder(
    metadata_gateway: FakeGateway, tmp_path: Path
) -> None:
    (tmp_path / "secret.png").write_bytes(png(1))
    manifest = tmp_path / "upload" / "items.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"image": "../secret.png", "caption": "x"}) + "\n")
    args = ["index", str(manifest), "-c", "m", "--gateway", GATEWAY, "--token", "t"]
    args += ["--journal", str(tmp_path / "journal.jsonl")]

    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "items.jsonl:1" in result.output and "--allow-outside" in result.output
    assert metadata_gateway.metadata.get("/collections/m").status_code == 404  # nothing sent

    result = invoke(*args, "--allow-outside")
    assert result.exit_code == 0, result.output
    assert "1 indexed" in result.output


def test_run_keeps_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(cli, "run_stack", lambda *args: calls.append(args))
    result = invoke("run")
    assert result.exit_code == 0, result.output
    result = invoke(
        "run", "--data-dir", "/tmp/x", "--model", "m", "--redis-url", "redis://r:1/0", "--no-demo"
    )
    assert result.exit_code == 0, result.output
    assert calls == [
        (Path("var"), None, "redis://127.0.0.1:6379/0", False),
        (Path("/tmp/x"), "m", "redis://r:1/0", True),
    ]
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "--help"])
    assert exited.value.code == 0


def test_evaluate_and_train_hand_every_argument_to_their_own_parsers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import crossmodal.evaluate.__main__ as evaluate_main
    import crossmodal.train.__main__ as train_main

    for name, module in (("evaluate", evaluate_main), ("train", train_main)):
        help_text = invoke(name, "--help")
        assert help_text.exit_code == 0, help_text.output
        assert f"usage: crossmodal {name}" in help_text.output
        assert "--model" in help_text.output

        calls: list[tuple[list[str], str]] = []
        monkeypatch.setattr(
            module, "main", lambda argv, prog, calls=calls: calls.append((argv, prog)) or 3
        )
        result = invoke(name, "--model", "m", "--out", "r.json", "--ks", "1", "5")
        assert result.exit_code == 3  # the command's own exit status
        assert calls == [
            (["--model", "m", "--out", "r.json", "--ks", "1", "5"], f"crossmodal {name}")
        ]
