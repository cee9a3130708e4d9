"""``python -m services.gateway`` with ``GATEWAY_WORKERS=2``: two worker processes on one port,
whose metrics a scrape (of the main port or of the metrics port) adds up, that outlive the
death of a worker (uvicorn's supervisor replaces it, and its counts stay), and whose metrics
directory goes with the gateway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.services.gateway.test_gateway_login import free_port

REPO = Path(__file__).resolve().parents[3]
REJECTED = {"service": "gateway", "endpoint": "/search/text", "method": "POST", "status": "401"}


class Gateway:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()
        env = {
            **os.environ,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.port),
            "GATEWAY_METRICS_PORT": str(self.metrics_port),
            "GATEWAY_WORKERS": "2",
            "GATEWAY_CACHE_PREFIX": f"workers-test-{os.getpid()}",
            # Nothing behind it: the requests below are refused before any upstream call.
            "GATEWAY_AUTH_URL": f"http://127.0.0.1:{free_port()}",
            # Where the gateway makes its metrics directory.
            "TMPDIR": str(self.tmp),
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log = tmp_path / "gateway.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.gateway"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        """The supervisor's worker processes (not multiprocessing's resource tracker)."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        found = []
        for child in children:
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in command:
                found.append(int(child))
        return found

    def wait_serving(self, workers: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                ok = httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok and len(self.workers()) == workers:
                return
            time.sleep(0.2)
        raise TimeoutError(f"not {workers} workers serving:\n{self.log.read_text()[-3000:]}")

    def rejected_searches(self, count: int) -> None:
        """``count`` searches without a token, eight at a time on connections of their own."""

        def one(_: int) -> int:
            response = httpx.post(f"{self.url}/search/text", json={"query": "a cat"}, timeout=10)
            return response.status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(one, range(count))) == {401}

    def scrape(self, port: int) -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "multimodal_requests_total" and sample.labels == REJECTED:
                    out["rejected"] = sample.value
                elif sample.name.startswith("process_") and not sample.labels:
                    out[sample.name] = sample.value
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gateway = Gateway(tmp_path)
    try:
        yield gateway
    finally:
        gateway.stop()
        # No worker outlives the gateway (multiprocessing's resource tracker may take a moment
        # to see that its parent is gone).
        deadline = time.monotonic() + 10
        while leftover := _group(gateway.process.pid):
            if time.monotonic() > deadline:
                os.killpg(gateway.process.pid, signal.SIGKILL)
                break
            time.sleep(0.1)
        assert not leftover


def _group(pgid: int) -> list[str]:
    found = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
    return found.stdout.split()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_two_workers_count_every_request_once_and_outlive_a_worker(gateway: Gateway) -> None:
    gateway.wait_serving(workers=2)
    (metrics_dir,) = gateway.tmp.glob("gateway-metrics-*")

    gateway.rejected_searches(40)
    for port in (gateway.port, gateway.metrics_port):
        scraped = gateway.scrape(port)
        assert scraped["rejected"] == 40
        # The whole group's memory, not the one process that answered the scrape.
        group = [gateway.process.pid, *gateway.workers()]
        assert scraped["process_resident_memory_bytes"] >= 0.9 * sum(map(_rss_bytes, group))
        assert scraped["process_cpu_seconds_total"] > 0

    killed = gateway.workers()[0]
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while killed in gateway.workers() or len(gateway.workers()) < 2:
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        time.sleep(0.2)
    gateway.wait_serving(workers=2)

    gateway.rejected_searches(24)
    assert gateway.scrape(gateway.metrics_port)["rejected"] == 64
    assert gateway.scrape(gateway.port)["rejected"] == 64

    gateway.stop()
    assert gateway.process.returncode == 0, gateway.log.read_text()[-3000:]
    assert not metrics_dir.exists()
