"""An app running under Starlette's TestClient (its lifespan included), lent to async clients:
``ServiceClient(..., transport=Lent(client))`` calls the real app in-process."""

from __future__ import annotations

import httpx
from fastapi.testclient import TestClient


class Lent(httpx.AsyncBaseTransport):
    """``calls``, when set to a list, records each request's path as ``"<name> <path>"``."""

    def __init__(self, client: TestClient, name: str = "app") -> None:
        self.client = client
        self.name = name
        self.calls: list[str] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.calls is not None:
            self.calls.append(f"{self.name} {request.url.path}")
        body = await request.aread()
        answer = self.client.request(
            request.method, str(request.url), headers=request.headers, content=body
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)
