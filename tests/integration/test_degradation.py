"""Rate limits, key rotation and graceful degradation, against a stack of its own (module scope):
a private ``redis-server`` that can be killed and restarted (the shared one on 6379 is never
touched), tiny rate limits, and a short circuit-breaker cool-down. Services are stopped, killed
and frozen (SIGSTOP) for real.

Requests come from distinct client addresses (``X-Forwarded-For``, which the gateway of this
stack takes from 127.0.0.1 as from a trusted proxy), so the per-IP limits of one test never
throttle another.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis

from crossmodal.demo.shapes import demo_collection
from crossmodal.stack import LocalStack
from tests.integration.support import (
    DEMO_USER,
    add_item,
    assert_problem,
    free_ports,
    png_bytes,
    running_stack,
)

COLLECTION = "degraded"
SEARCH_BUDGET = 2.0  # the gateway's default search_timeout_seconds
BREAKER_RESET = 3.0
_ips = (f"198.51.{n // 250}.{n % 250 + 1}" for n in itertools.count(1))


def fresh_ip() -> dict[str, str]:
    return {"X-Forwarded-For": next(_ips)}


class PrivateRedis:
    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is needed for the degradation tests"
        command = [server, "--bind", "127.0.0.1", "--port", str(self.port)]
        command += ["--save", "", "--appendonly", "no"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "the private redis-server did not start"
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(free_ports(1)[0], tmp_path_factory.mktemp("redis") / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def dstack(
    demo_model_dir: Path, private_redis: PrivateRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with running_stack(
        tmp_path_factory.mktemp("degraded-stack"),
        demo_model_dir,
        redis_url=private_redis.url,
        extra_env={
            "GATEWAY_RATE_LIMITS": json.dumps({"items:read": {"rate": 0.25, "burst": 3}}),
            "GATEWAY_IP_RATE_LIMIT": json.dumps({"rate": 0.5, "burst": 15}),
            "GATEWAY_TOKEN_RATE_LIMIT": json.dumps({"rate": 0.1, "burst": 4}),
            "GATEWAY_TRUSTED_PROXIES": json.dumps(["127.0.0.1"]),
            "GATEWAY_BREAKER_FAILURE_THRESHOLD": "2",
            "GATEWAY_BREAKER_RESET_SECONDS": str(BREAKER_RESET),
            "GATEWAY_REDIS_RETRY_SECONDS": "1",
            "GATEWAY_REVOCATION_POLL_SECONDS": "1",
            "GATEWAY_JWKS_MIN_REFRESH_SECONDS": "0",
            "AUTH_KEY_CHECK_INTERVAL_SECONDS": "0.2",
            # Cheap hashes: this module logs in a lot, on two shared cores.
            "AUTH_ARGON2_TIME_COST": "1",
            "AUTH_ARGON2_MEMORY_KIB": "1024",
        },
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def gw(dstack: LocalStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=dstack.url("gateway"), timeout=30.0) as client:
        yield client


def login(gw: httpx.Client, username: str, password: str, **data: str) -> str:
    response = gw.post(
        "/auth/token",
        data={"grant_type": "password", "username": username, "password": password, **data},
        headers=fresh_ip(),
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


@pytest.fixture(scope="module")
def admin(gw: httpx.Client) -> dict[str, str]:
    return {"Authorization": f"Bearer {login(gw, *DEMO_USER)}"}


@pytest.fixture(scope="module")
def items(gw: httpx.Client, admin: dict[str, str]) -> list[dict[str, Any]]:
    added = []
    for demo in list(demo_collection())[:6]:
        added.append(
            add_item(
                gw,
                {**admin, **fresh_ip()},
                png_bytes(demo.image),
                collection=COLLECTION,
                captions=demo.captions,
                attributes={"colour": demo.colour, "shape": demo.shape},
            )
        )
    return added


def new_user(gw: httpx.Client, admin: dict[str, str], scopes: list[str]) -> str:
    name, password = f"u-{uuid.uuid4().hex[:10]}", f"pw-{uuid.uuid4().hex}"
    response = gw.post(
        "/admin/principals",
        headers={**admin, **fresh_ip()},
        json={"name": name, "secret": password, "scopes": scopes},
    )
    assert response.status_code == 201, response.text
    return login(gw, name, password)


def search(gw: httpx.Client, auth: dict[str, str], query: str, **fields: Any) -> httpx.Response:
    body = {"query": query, "collection": COLLECTION, **fields}
    return gw.post("/search/text", headers={**auth, **fresh_ip()}, json=body)


def timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def wait_until_ok(call: Any, seconds: float) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while True:
        response = call()
        if response.status_code < 500:
            return response
        assert time.monotonic() < deadline, f"not recovered after {seconds}s: {response.text}"
        time.sleep(0.5)


# -- rate limits ------------------------------------------------------------------------------


def test_rate_limit_per_principal_and_scope(gw: httpx.Client, admin: dict[str, str]) -> None:
    user = {"Authorization": f"Bearer {new_user(gw, admin, ['items:read', 'search:text'])}"}
    other = {"Authorization": f"Bearer {new_user(gw, admin, ['items:read'])}"}
    probe = "/items/999999999"
    for _ in range(3):  # the burst of items:read in this stack
        assert_problem(gw.get(probe, headers={**user, **fresh_ip()}), 404, "item_not_found")
    # Each from another address: the principal's bucket is empty, whatever the address. (A slow
    # machine may have refilled one token meanwhile, hence a few tries.)
    for _ in range(3):
        refused = gw.get(probe, headers={**user, **fresh_ip()})
        if refused.status_code == 429:
            break
    body = assert_problem(refused, 429, "rate_limited")
    assert body["limit"] == "principal"
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 4  # one token every 4 s
    # Another principal, and another scope of the same principal, have their own buckets.
    assert_problem(gw.get(probe, headers={**other, **fresh_ip()}), 404, "item_not_found")
    assert search(gw, user, "a red circle").status_code != 429
    time.sleep(retry_after)
    assert_problem(gw.get(probe, headers={**user, **fresh_ip()}), 404, "item_not_found")


def test_rate_limit_per_client_ip(gw: httpx.Client) -> None:
    flood = fresh_ip()
    for _ in range(15):  # the IP burst: unauthenticated requests are counted too
        assert_problem(gw.get("/items/1", headers=flood), 401, "missing_token")
    for _ in range(3):  # a slow machine may have refilled a token or two meanwhile
        refused = gw.get("/items/1", headers=flood)
        if refused.status_code == 429:
            break
    assert_problem(refused, 429, "rate_limited")
    assert refused.json()["limit"] == "ip"
    assert int(refused.headers["retry-after"]) >= 1
    assert_problem(gw.get("/items/1", headers=fresh_ip()), 401, "missing_token")


def test_token_endpoint_is_limited_per_ip(gw: httpx.Client) -> None:
    guesser = fresh_ip()
    wrong = {"grant_type": "password", "username": "demo", "password": "guess"}
    for _ in range(4):
        assert_problem(gw.post("/auth/token", data=wrong, headers=guesser), 401, "invalid_grant")
    refused = gw.post("/auth/token", data=wrong, headers=guesser)
    assert_problem(refused, 429, "rate_limited")
    assert refused.json()["limit"] == "token"
    assert int(refused.headers["retry-after"]) >= 1
    # The right password from the same address waits too; another address is served.
    right = {"grant_type": "password", "username": DEMO_USER[0], "password": DEMO_USER[1]}
    assert gw.post("/auth/token", data=right, headers=guesser).status_code == 429
    assert gw.post("/auth/token", data=right, headers=fresh_ip()).status_code == 200


# -- key rotation -----------------------------------------------------------------------------


def _kid(token: str) -> str:
    return jwt.get_unverified_header(token)["kid"]


def _accepted_within(gw: httpx.Client, token: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        response = gw.get("/admin/keys", headers={"Authorization": f"Bearer {token}", **fresh_ip()})
        if response.status_code == 200:
            return
        assert time.monotonic() < deadline, response.text
        time.sleep(0.3)


def test_key_rotation_keeps_old_tokens_valid(
    gw: httpx.Client, dstack: LocalStack, admin: dict[str, str]
) -> None:
    old_token = admin["Authorization"].split()[1]
    old_kid = _kid(old_token)
    response = gw.post("/admin/keys/rotate", headers={**admin, **fresh_ip()})
    assert response.status_code == 200, response.text
    rotation = response.json()
    assert rotation["previous_kid"] == old_kid != rotation["kid"]
    jwks = httpx.get(f"{dstack.url('auth')}/.well-known/jwks.json").json()
    assert [k["kid"] for k in jwks["keys"]][:2] == [rotation["kid"], old_kid]
    new_token = login(gw, *DEMO_USER)
    assert _kid(new_token) == rotation["kid"]
    _accepted_within(gw, new_token)  # the gateway fetched the new key on the unknown kid
    _accepted_within(gw, old_token, seconds=0)  # the old key is still published

    # The admin command, run beside the live service, rotates again; the service follows.
    env = {**dstack.services["auth"].env}
    done = subprocess.run(
        [sys.executable, "-m", "services.auth.admin", "--json", "rotate-key"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    third = json.loads(done.stdout)
    assert third["previous_kid"] == rotation["kid"]
    # The service re-reads its key store every 0.2 s; each login hashes a password, so the
    # deadline leaves room for a machine three times slower than this one.
    deadline = time.monotonic() + 30
    while _kid(token := login(gw, *DEMO_USER)) != third["kid"]:
        assert time.monotonic() < deadline, "the running auth service kept the old key"
        time.sleep(0.3)
    _accepted_within(gw, token)
    _accepted_within(gw, old_token, seconds=0)


# -- degradation ------------------------------------------------------------------------------


def test_redis_down_searches_answered_writes_refused_then_recovery(
    gw: httpx.Client,
    admin: dict[str, str],
    items: list[dict[str, Any]],
    private_redis: PrivateRedis,
) -> None:
    assert search(gw, admin, "a red circle", top_k=2).headers["x-cache"] == "miss"
    assert search(gw, admin, "a red circle", top_k=2).headers["x-cache"] == "hit"
    private_redis.kill()
    try:
        for _ in range(2):
            response, took = timed(lambda: search(gw, admin, "a red circle", top_k=2))
            assert response.status_code == 200, response.text
            assert response.headers["x-cache"] == "miss"  # answered without the cache
            assert response.json()["results"]
            assert took < SEARCH_BUDGET + 2
        # Reads of a rate-limited scope fail open ...
        response = gw.get(f"/items/{items[0]['id']}", headers={**admin, **fresh_ip()})
        assert response.status_code == 200, response.text
        # ... writes fail closed.
        response = gw.post(
            "/items",
            headers={**admin, **fresh_ip()},
            data={"collection": COLLECTION, "caption": ["a green star"]},
            files={"image": ("x.png", png_bytes(demo_collection()[10].image), "image/png")},
        )
        assert_problem(response, 503, "rate_limiter_unavailable")
        assert response.headers["retry-after"]
    finally:
        private_redis.start()
    # Back by itself: no restart of the gateway.
    deadline = time.monotonic() + 15
    while search(gw, admin, "a blue square", top_k=2).headers.get("x-cache") != "hit":
        assert time.monotonic() < deadline, "the cache did not come back"
        time.sleep(0.5)
    added = add_item(
        gw,
        {**admin, **fresh_ip()},
        png_bytes(demo_collection()[10].image),
        collection=COLLECTION,
        captions=["written once redis was back"],
    )
    assert added["status"] == "indexed"


def _signal(stack: LocalStack, name: str, sig: signal.Signals) -> None:
    process = stack.services[name].process
    assert process is not None and process.poll() is None
    os.kill(process.pid, sig)


def test_slow_feature_service_is_a_503_within_the_budget_then_the_breaker_opens(
    gw: httpx.Client, dstack: LocalStack, admin: dict[str, str], items: list[dict[str, Any]]
) -> None:
    _signal(dstack, "feature", signal.SIGSTOP)  # it hangs: connections accepted, no answers
    try:
        response, took = timed(lambda: search(gw, admin, "a slow query"))
        assert_problem(response, 503, "feature_timeout")
        assert response.headers["retry-after"]
        assert took < SEARCH_BUDGET + 2, took
        # After as many timeouts as the breaker threshold (2 here; a background model-id check
        # may count as one) the circuit opens: refused at once, without waiting on the service.
        for n in range(3):
            response, took = timed(lambda n=n: search(gw, admin, f"a slow query {n}"))
            body = response.json()
            assert response.status_code == 503 and took < SEARCH_BUDGET + 2, (body, took)
            if body.get("circuit") == "open":
                break
            assert_problem(response, 503, "feature_timeout")
        body = assert_problem(response, 503, "feature_unavailable")
        assert body["circuit"] == "open"
        assert 1 <= int(response.headers["retry-after"]) <= BREAKER_RESET
        assert took < SEARCH_BUDGET  # did not wait for the frozen service
    finally:
        _signal(dstack, "feature", signal.SIGCONT)
    response = wait_until_ok(lambda: search(gw, admin, "a thawed query"), BREAKER_RESET + 15)
    assert response.status_code == 200, response.text


def test_feature_service_down_cached_queries_still_answered_then_recovery(
    gw: httpx.Client, dstack: LocalStack, admin: dict[str, str], items: list[dict[str, Any]]
) -> None:
    assert search(gw, admin, "a green triangle", top_k=3).status_code == 200
    dstack.services["feature"].stop(kill=True)
    try:
        # A new page of a known query: its embedding is in Redis, no feature call needed.
        response = search(gw, admin, "a green triangle", top_k=4)
        assert response.status_code == 200, response.text
        assert response.headers["x-cache"] == "miss"
        assert len(response.json()["results"]) == 4
        # A new query needs the feature service: a quick 503, then the breaker opens.
        seen = []
        for n in range(3):
            response, took = timed(lambda n=n: search(gw, admin, f"an unseen query {n}"))
            body = assert_problem(response, 503, "feature_unavailable")
            assert took < SEARCH_BUDGET + 2
            seen.append(body.get("circuit"))
        assert seen[-1] == "open"
    finally:
        dstack.services["feature"].start()
        dstack.services["feature"].wait_ready(120)
    response = wait_until_ok(lambda: search(gw, admin, "a recovered query"), BREAKER_RESET + 15)
    assert response.status_code == 200, response.text


def test_retrieval_service_down_is_a_503_then_recovery(
    gw: httpx.Client, dstack: LocalStack, admin: dict[str, str], items: list[dict[str, Any]]
) -> None:
    # An image no other test uploads: a shape on a background of its own.
    shape = list(demo_collection())[10].image.copy()
    shape.putpixel((0, 0), (1, 2, 3))
    new_image = png_bytes(shape)
    digest = hashlib.sha256(new_image).hexdigest()
    dstack.services["retrieval"].stop()
    try:
        response, took = timed(lambda: search(gw, admin, "a yellow star"))
        assert_problem(response, 503, "retrieval_unavailable")
        assert response.headers["retry-after"]
        assert took < SEARCH_BUDGET + 2
        # A write whose vectors cannot be made durable is refused, and recorded as failed with
        # its reason rather than left half-made.
        upload = gw.post(
            "/items",
            headers={**admin, **fresh_ip()},
            data={"collection": COLLECTION, "caption": ["a brand new shape"]},
            files={"image": ("new.png", new_image, "image/png")},
        )
        assert_problem(upload, 503, "retrieval_unavailable")
    finally:
        dstack.services["retrieval"].start()
        dstack.services["retrieval"].wait_ready(120)
    metadata = dstack.service_headers("metadata")
    known = httpx.post(
        f"{dstack.url('metadata')}/collections/{COLLECTION}/hashes",
        json={"sha256": [digest]},
        headers=metadata,
        timeout=10,
    ).json()
    (match,) = known["items"]
    item_id = match["id"]
    failed = httpx.get(
        f"{dstack.url('metadata')}/items/{item_id}", headers=metadata, timeout=10
    ).json()
    assert failed["status"] == "failed"
    assert "retrieval_unavailable" in failed["error"]

    response = wait_until_ok(lambda: search(gw, admin, "a yellow star"), BREAKER_RESET + 15)
    assert response.status_code == 200, response.text
    assert response.json()["results"]
    assert item_id not in [r["item_id"] for r in response.json()["results"]]
    # Sending it again retries the failed item, which then becomes searchable.
    retried = wait_until_ok(
        lambda: gw.post(
            "/items",
            headers={**admin, **fresh_ip()},
            data={"collection": COLLECTION, "caption": ["a brand new shape"]},
            files={"image": ("new.png", new_image, "image/png")},
        ),
        BREAKER_RESET + 15,
    )
    assert retried.status_code == 201, retried.text
    assert retried.json()["status"] == "indexed"
    found = search(gw, admin, "a brand new shape", mode="keyword").json()["results"]
    assert retried.json()["id"] in [r["item_id"] for r in found]
