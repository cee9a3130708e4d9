"""The real process, ``python -m services.retrieval``, killed with SIGKILL at a random moment while
a client streams upserts, overwrites and deletes: after a restart every acknowledged write is
reflected, and the one write in flight at the kill is either wholly applied or not at all."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from services.retrieval import snapshots, wal
from tests.service_tokens import auth_environment, service_headers

REPO = Path(__file__).resolve().parents[3]
DIM = 16
COLLECTION = "stream"
MODALITIES = ("image", "text")
ROUNDS = 3

State = dict[tuple[str, int], int]  # (modality, id) -> version of its vector


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vector_for(id_: int, version: int) -> np.ndarray:
    """A unit vector fixed by (id, version): the version of a stored vector can be read back."""
    v = np.random.default_rng([id_, version]).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class Service:
    def __init__(self, data_dir: Path, log_file: Path, auth_url: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "RETRIEVAL_HOST": "127.0.0.1",
            "RETRIEVAL_PORT": str(self.port),
            "RETRIEVAL_METRICS_PORT": str(self.metrics_port),
            "RETRIEVAL_AUTH_URL": auth_url,
            "RETRIEVAL_DATA_DIR": str(data_dir),
            # Small, so snapshots and log rotation happen (and may be cut short by the kill).
            "RETRIEVAL_SNAPSHOT_EVERY": "7",
            # Index builds past a few hundred vectors run in the background.
            "RETRIEVAL_INLINE_REBUILD_MAX": "200",
        }
        self.log_file = log_file
        with log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.retrieval"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # A service token signed with the key the auth service below publishes.
        self.client = httpx.Client(
            base_url=self.base, headers=service_headers("retrieval"), timeout=10
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_file.read_text()
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        pytest.fail(f"not ready after {timeout}s:\n{self.log_file.read_text()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.client.close()


@pytest.fixture(scope="module")
def auth_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real auth service, whose JWKS the retrieval process verifies its callers with."""
    directory = tmp_path_factory.mktemp("auth")
    port = free_port()
    env = {**os.environ, **auth_environment(directory)}
    env |= {"AUTH_HOST": "127.0.0.1", "AUTH_PORT": str(port)}
    log_file = directory / "auth.log"
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.auth"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_file.read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        service.kill()


@dataclass
class Op:
    kind: str  # upsert | delete
    modality: str | None
    ids: list[int]
    version: int = 0

    def body(self) -> dict[str, Any]:
        if self.kind == "delete":
            return {"ids": self.ids, "modality": self.modality}
        vectors = [vector_for(i, self.version).tolist() for i in self.ids]
        return {"modality": self.modality, "model_id": "m", "ids": self.ids, "vectors": vectors}

    def apply(self, state: State) -> State:
        after = dict(state)
        for id_ in self.ids:
            if self.kind == "upsert":
                after[(self.modality or "", id_)] = self.version
            else:
                for m in MODALITIES if self.modality is None else (self.modality,):
                    after.pop((m, id_), None)
        return after


@dataclass
class Stream:
    """Generates operations against the current state and sends them one at a time."""

    rng: random.Random
    state: State
    next_id: int = 0
    version: int = 1
    acknowledged: int = 0
    in_flight: Op | None = None
    errors: list[str] = field(default_factory=list)

    def make(self) -> Op:
        self.version += 1
        roll = self.rng.random()
        live = sorted(self.state)
        if roll < 0.5 or len(live) < 20:
            modality = self.rng.choice(MODALITIES)
            count = self.rng.randint(1, 20)
            ids = list(range(self.next_id, self.next_id + count))
            self.next_id += count
            return Op("upsert", modality, ids, self.version)
        if roll < 0.75:  # overwrite existing vectors of one modality, with a new id among them
            modality = self.rng.choice(MODALITIES)
            pool = [i for m, i in live if m == modality] or [0]
            ids = sorted(set(self.rng.sample(pool, min(len(pool), 10))) | {self.next_id})
            self.next_id += 1
            return Op("upsert", modality, ids, self.version)
        modality = self.rng.choice([*MODALITIES, None])
        picked = self.rng.sample(live, min(len(live), self.rng.randint(1, 10)))
        ids = sorted({i for _, i in picked} | {10**12 + self.version})  # one unknown id
        return Op("delete", modality, ids)

    def run(self, client: httpx.Client, stop: threading.Event) -> None:
        while not stop.is_set():
            op = self.make()
            path = f"/collections/{COLLECTION}/{op.kind}"
            self.in_flight = op
            try:
                response = client.post(path, json=op.body())
            except httpx.TransportError:
                return  # killed: the outcome of ``op`` is unknown
            if response.status_code != 200:
                self.errors.append(f"{op.kind} answered {response.status_code}: {response.text}")
                return
            self.state = op.apply(self.state)
            self.in_flight = None
            self.acknowledged += 1


def read_ids(client: httpx.Client, modality: str) -> set[int]:
    ids: set[int] = set()
    after = -1
    while True:
        response = client.get(
            f"/collections/{COLLECTION}/ids",
            params={"modality": modality, "after": after, "limit": 1000},
        )
        assert response.status_code == 200, response.text
        page = response.json()
        ids.update(page["ids"])
        if page["next_after"] is None:
            return ids
        after = page["next_after"]


def holds(client: httpx.Client, state: State) -> bool:
    """Whether the service holds exactly ``state``: the same ids, each with its version's vector
    (a stored vector is its own best match, with score 1, among the ids of its modality)."""
    for modality in MODALITIES:
        expected = {i: v for (m, i), v in state.items() if m == modality}
        if read_ids(client, modality) != set(expected):
            return False
        ids = sorted(expected)
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            queries = [vector_for(i, expected[i]).tolist() for i in part]
            response = client.post(
                f"/collections/{COLLECTION}/search",
                json={"modality": modality, "vectors": queries, "top_k": 1, "allow_ids": ids},
            )
            assert response.status_code == 200, response.text
            for id_, hits in zip(part, response.json()["results"], strict=True):
                if hits[0]["id"] != id_ or abs(hits[0]["score"] - 1.0) > 1e-4:
                    return False
    return True


def test_metrics_alone_on_the_metrics_port_and_the_api_behind_a_service_token(
    tmp_path: Path, services: list[Service], auth_url: str
) -> None:
    service = Service(tmp_path / "data", tmp_path / "service.log", auth_url)
    services.append(service)
    service.wait_ready()
    assert service.client.get("/collections").status_code == 200
    refused = httpx.get(f"{service.base}/collections", timeout=10)
    assert (refused.status_code, refused.json()["code"]) == (401, "missing_token")
    # The scrape needs no token, on its own port (the one a NetworkPolicy opens to Prometheus),
    # where no API route answers.
    metrics = f"http://127.0.0.1:{service.metrics_port}"
    scraped = httpx.get(f"{metrics}/metrics", timeout=10)
    assert scraped.status_code == 200 and "multimodal_requests_total" in scraped.text
    assert httpx.get(f"{metrics}/collections", timeout=10).text.startswith("# HELP")


def test_sigkill_during_a_stream_of_writes_loses_no_acknowledged_write(
    tmp_path: Path, services: list[Service], auth_url: str
) -> None:
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    log_file = tmp_path / "service.log"
    stream = Stream(rng, {})
    total_acknowledged = 0
    service = Service(data_dir, log_file, auth_url)
    services.append(service)
    service.wait_ready()
    # IVF: trained once a thousand vectors exist and retrained in the background as the set
    # doubles, so kills also land during index builds.
    response = service.client.put(
        f"/collections/{COLLECTION}",
        json={"model_id": "m", "dim": DIM, "index": {"factory": "IVF16,Flat"}},
    )
    assert response.status_code == 201, response.text
    for round_ in range(ROUNDS):
        stop = threading.Event()
        worker = threading.Thread(target=stream.run, args=(service.client, stop))
        worker.start()
        time.sleep(rng.uniform(0.4, 1.6))
        service.proc.send_signal(signal.SIGKILL)  # no shutdown snapshot; maybe mid-snapshot
        worker.join(15)
        stop.set()
        assert not worker.is_alive()
        assert not stream.errors, stream.errors
        assert service.proc.wait(10) == -signal.SIGKILL
        total_acknowledged += stream.acknowledged
        stream.acknowledged = 0

        service = Service(data_dir, log_file, auth_url)
        services.append(service)
        service.wait_ready()
        candidates = [stream.state]
        if stream.in_flight is not None:
            candidates.append(stream.in_flight.apply(stream.state))
        matched = [c for c in candidates if holds(service.client, c)]
        assert matched, (
            f"seed {seed}, round {round_}: the state after the restart is neither the "
            f"acknowledged one nor that plus the whole write in flight ({stream.in_flight})"
        )
        stream.state, stream.in_flight = matched[-1], None
    assert total_acknowledged >= 20, f"seed {seed}: too few writes to mean anything"

    # A graceful stop (SIGTERM) folds the log into a snapshot; the state survives it.
    service.client.close()
    service.proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal once its shutdown completed.
    assert service.proc.wait(30) in (0, -signal.SIGTERM), log_file.read_text()
    collection_dir = data_dir / COLLECTION
    generation = snapshots.generations(collection_dir)[-1]
    assert [p.name for p in collection_dir.glob("wal-*.log")] == [
        wal.wal_path(collection_dir, generation).name
    ]
    assert wal.wal_path(collection_dir, generation).stat().st_size == 0
    final = Service(data_dir, log_file, auth_url)
    services.append(final)
    final.wait_ready()
    assert holds(final.client, stream.state), f"seed {seed}"
