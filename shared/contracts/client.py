"""What the typed clients of shared/contracts have in common."""

from __future__ import annotations

from shared.http import ServiceClient

JSON_HEADERS = {"Content-Type": "application/json"}


class ServiceApi:
    """A typed client: one method per endpoint of one service, over a ``ServiceClient`` (its
    timeouts, retries, deadline and circuit breaker). Requests are the contract's models
    serialised by pydantic; answers are parsed into the contract's models, so a field renamed on
    either side fails at the first call, in tests."""

    def __init__(self, http: ServiceClient) -> None:
        self.http = http

    @property
    def name(self) -> str:
        return self.http.name

    async def aclose(self) -> None:
        await self.http.aclose()
