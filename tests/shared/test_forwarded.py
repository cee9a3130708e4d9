"""Who may name the client address: uvicorn as ``shared.app.serve`` runs it reads
``X-Forwarded-For`` only from the gateway's configured proxies (``GATEWAY_TRUSTED_PROXIES``,
none by default) and never in the internal services, whatever ``FORWARDED_ALLOW_IPS`` says."""

from __future__ import annotations

import asyncio
import os
import runpy
import socket
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import shared.app
from crossmodal.stack import SERVICES
from services.gateway.settings import GatewaySettings
from shared.app import uvicorn_options
from shared.settings import ServiceSettings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What each entry point hands to uvicorn.run, which is not run."""
    captured: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: captured.update(options))
    monkeypatch.setattr(shared.app, "configure_logging", lambda *args: None)
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    # uvicorn would fall back to this when not told; the entry points always tell it.
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    return captured


@pytest.mark.parametrize("spec", SERVICES, ids=[spec.name for spec in SERVICES])
def test_no_entry_point_trusts_forwarded_headers_by_default(
    spec: Any, started: dict[str, Any]
) -> None:
    runpy.run_module(spec.module, run_name="__main__")
    assert started["proxy_headers"] is False
    assert started["forwarded_allow_ips"] == []


def test_the_gateway_trusts_its_configured_proxies(
    started: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_TRUSTED_PROXIES", '["10.244.0.0/16", "192.0.2.7"]')
    runpy.run_module("services.gateway", run_name="__main__")
    assert started["proxy_headers"] is True
    assert started["forwarded_allow_ips"] == ["10.244.0.0/16", "192.0.2.7"]


@pytest.mark.parametrize("proxy", ["*", "0.0.0.0/0", "::/0", "proxy.internal", "10.0.0.300"])
def test_trusting_everyone_or_a_name_is_refused(proxy: str) -> None:
    with pytest.raises(ValidationError, match="trusted prox"):
        GatewaySettings(trusted_proxies=(proxy,))


async def _client_address(trusted_proxies: tuple[str, ...], forwarded_for: str) -> str:
    async def echo(request: Request) -> PlainTextResponse:
        assert request.client is not None
        return PlainTextResponse(request.client.host)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServiceSettings(port=port)
    options = uvicorn_options(settings, trusted_proxies=trusted_proxies)
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/", echo)]), **options))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "the server did not start"
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(
                f"http://127.0.0.1:{port}/", headers={"X-Forwarded-For": forwarded_for}
            )
        return response.text
    finally:
        server.should_exit = True
        await task


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    assert await _client_address((), "203.0.113.9") == "127.0.0.1"
    assert await _client_address(("10.0.0.0/8",), "203.0.113.9") == "127.0.0.1"


async def test_forwarded_for_from_a_trusted_proxy_names_the_client() -> None:
    assert await _client_address(("127.0.0.1",), "203.0.113.9") == "203.0.113.9"
    # Behind two trusted hops, the first untrusted address from the right is the client.
    assert await _client_address(("127.0.0.0/8",), "203.0.113.9, 127.0.0.5") == "203.0.113.9"
