"""What the typed clients of shared/contracts have in common."""

from __future__ import annotations

from pydantic import BaseModel

from shared.http import ServiceClient

JSON_HEADERS = {"Content-Type": "application/json"}


class ServiceApi:
    """A typed client: one method per endpoint of one service, over a ``ServiceClient`` (its
    timeouts, retries, deadline and circuit breaker). Requests are the contract's models
    serialised by pydantic; answers are parsed into the contract's models, so a field renamed on
    either side fails at the first call, in tests."""

    def __init__(self, http: ServiceClient) -> None:
        self.http = http

    async def post_json(self, path: str, body: BaseModel, *, retry: bool | None = None) -> bytes:
        """POST the model as JSON (``None`` fields left out); the answer's bytes."""
        response = await self.http.request(
            "POST",
            path,
            content=body.model_dump_json(exclude_none=True),
            headers=JSON_HEADERS,
            retry=retry,
        )
        return response.content

    @property
    def name(self) -> str:
        return self.http.name

    async def aclose(self) -> None:
        await self.http.aclose()
