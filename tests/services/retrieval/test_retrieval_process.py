"""The real process: ``python -m services.retrieval``, killed with SIGKILL, keeps every
acknowledged write."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

MakeVectors = Callable[[int, int], np.ndarray]
REPO = Path(__file__).resolve().parents[3]
DIM = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    def __init__(self, data_dir: Path, log_file: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "RETRIEVAL_HOST": "127.0.0.1",
            "RETRIEVAL_PORT": str(self.port),
            "RETRIEVAL_DATA_DIR": str(data_dir),
            # Small, so snapshots and log rotation happen (and may be cut short by the kill).
            "RETRIEVAL_SNAPSHOT_EVERY": "3",
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
        self.client = httpx.Client(base_url=self.base, timeout=10)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_file.read_text()
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"not ready after {timeout}s:\n{self.log_file.read_text()}")

    def kill(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        service.kill()


def test_sigkill_loses_no_acknowledged_write(
    tmp_path: Path, services: list[Service], unit_vectors: MakeVectors
) -> None:
    data_dir = tmp_path / "data"
    log_file = tmp_path / "service.log"
    first = Service(data_dir, log_file)
    services.append(first)
    first.wait_ready()

    acknowledged: dict[tuple[str, int], np.ndarray] = {}
    for batch in range(8):
        modality = "image" if batch % 2 == 0 else "text"
        ids = list(range(batch * 10, batch * 10 + 5))
        vectors = unit_vectors(5, DIM)
        response = first.client.post(
            "/collections/photos/upsert",
            json={"modality": modality, "model_id": "m", "ids": ids, "vectors": vectors.tolist()},
        )
        assert response.status_code == 200, response.text
        acknowledged.update({(modality, i): v for i, v in zip(ids, vectors, strict=True)})
    response = first.client.post("/collections/photos/delete", json={"ids": [0, 11]})
    assert response.json() == {"deleted": 2}
    del acknowledged[("image", 0)], acknowledged[("text", 11)]
    first.kill()  # SIGKILL: no shutdown snapshot, maybe a background snapshot cut short
    assert first.proc.returncode == -signal.SIGKILL

    second = Service(data_dir, log_file)
    services.append(second)
    second.wait_ready()
    counts = second.client.get("/collections/photos").json()["counts"]
    assert counts == {"image": 19, "text": 19}
    for modality in ("image", "text"):
        keys = [i for m, i in acknowledged if m == modality]
        queries = np.stack([acknowledged[(modality, i)] for i in keys])
        response = second.client.post(
            "/collections/photos/search",
            json={"modality": modality, "vectors": queries.tolist(), "top_k": 1},
        )
        results = response.json()["results"]
        # Each stored vector is its own nearest neighbour, with its exact score.
        assert [hits[0]["id"] for hits in results] == keys
        assert [hits[0]["score"] for hits in results] == pytest.approx([1.0] * len(keys), abs=1e-5)
    for modality, deleted in (("image", 0), ("text", 11)):
        response = second.client.post(
            "/collections/photos/search",
            json={
                "modality": modality,
                "vectors": unit_vectors(1, DIM).tolist(),
                "allow_ids": [deleted],
            },
        )
        assert response.json() == {"results": [[]]}

    # A graceful stop (SIGTERM) folds the log into a snapshot.
    second.client.close()
    second.proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal once its shutdown completed.
    assert second.proc.wait(30) in (0, -signal.SIGTERM), log_file.read_text()
    collection_dir = data_dir / "photos"
    assert (collection_dir / "snapshot.npz").exists()
    assert [p.stat().st_size for p in collection_dir.glob("wal-*.log")] == [0]
