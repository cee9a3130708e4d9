"""GatewayClient.find_hashes asks in chunks the gateway accepts, whatever the batch size."""

from __future__ import annotations

import json

import httpx

from crossmodal.client import GatewayClient
from shared.contracts.metadata import MAX_HASHES


def test_a_long_hash_list_is_asked_in_chunks_the_gateway_accepts() -> None:
    asked: list[int] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        hashes = json.loads(request.read())["sha256"]
        if len(hashes) > MAX_HASHES:
            return httpx.Response(422, json={"code": "validation_error", "detail": "too many"})
        asked.append(len(hashes))
        # Every other hash is known.
        known = [{"sha256": h, "id": int(h, 16), "status": "indexed"} for h in hashes[::2]]
        return httpx.Response(200, json={"items": known})

    client = GatewayClient("http://gateway.test", token="t", transport=httpx.MockTransport(gateway))
    hashes = [f"{n:064x}" for n in range(MAX_HASHES + 100)]
    found = client.find_hashes("demo", hashes)
    assert asked == [MAX_HASHES, 100]
    assert found is not None and set(found) == set(hashes[:MAX_HASHES:2] + hashes[MAX_HASHES::2])
