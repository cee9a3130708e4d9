"""The SSRF guard and the bounded download behind URL ingestion. No external network: refusals
are decided before any connection, and the downloads go to a server on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from crossmodal.ingest.fetch import (
    FetchError,
    FetchPolicy,
    UrlRefused,
    check_url,
    fetch_url,
)

IMAGE = b"\x89PNG\r\n\x1a\n" + b"pixels" * 100


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *_: object) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}) and status != 204:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        if self.path == "/img.png":
            self._send(200, IMAGE, {"Content-Type": "image/png"})
        elif self.path == "/host":
            self._send(200, self.headers["Host"].encode(), {"Content-Type": "text/plain"})
        elif self.path == "/to-img":
            self._send(302, headers={"Location": "/img.png"})
        elif self.path == "/to-other-loopback":
            self._send(302, headers={"Location": f"http://127.0.0.2:{port}/img.png"})
        elif self.path == "/to-metadata":
            self._send(301, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif self.path == "/loop":
            self._send(302, headers={"Location": "/loop"})
        elif self.path == "/big":
            self._send(200, b"x" * 5000, {"Content-Type": "image/png"})
        elif self.path == "/big-unannounced":
            # No Content-Length: the limit must hold while streaming.
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"y" * 1000)
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, IMAGE)
        else:
            self._send(404, b"nope")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


LOCAL_ONLY = FetchPolicy(allowed_networks=FetchPolicy.networks(["127.0.0.1"]), timeout=0.5)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://127.8.9.10:8080/x.png",
        "http://localhost/x.png",
        "http://[::1]/x.png",
        "http://0.0.0.0/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.png",
        "http://172.16.5.4/x.png",
        "http://192.168.1.1/x.png",
        "http://100.64.0.1/x.png",  # carrier-grade NAT
        "http://192.0.2.10/x.png",  # documentation
        "http://224.0.0.1/x.png",  # multicast
        "http://240.0.0.1/x.png",  # reserved
        "http://[::ffff:127.0.0.1]/x.png",  # IPv4-mapped loopback
        "http://[fe80::1]/x.png",
        "http://[fc00::1]/x.png",
        "https://2130706433/x.png",  # 127.0.0.1 as one decimal number
        "file:///etc/passwd",
        "ftp://example.com/x.png",
        "gopher://127.0.0.1:6379/_INFO",
        "http://user:secret@example.com/x.png",
    ],
)
def test_guard_refuses(url: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(url, FetchPolicy())


def test_guard_accepts_public_addresses_and_resolves_once() -> None:
    calls: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return {"good.example": ["93.184.216.34"], "mixed.example": ["93.184.216.34", "10.1.2.3"]}[
            host
        ]

    policy = FetchPolicy(resolver=resolver)
    target = check_url("https://good.example/a.png", policy)
    assert (target.host, target.port, target.address) == ("good.example", 443, "93.184.216.34")
    assert check_url("http://8.8.8.8:8080/a.png", policy).address == "8.8.8.8"
    assert calls == [("good.example", 443)]  # literal addresses are not resolved
    # One private answer among public ones is enough to refuse.
    with pytest.raises(UrlRefused, match=r"10\.1\.2\.3"):
        check_url("http://mixed.example/a.png", policy)


def test_allow_flags() -> None:
    assert check_url("http://10.0.0.1/x", FetchPolicy(allow_private=True)).address == "10.0.0.1"
    allowed = FetchPolicy(allowed_networks=FetchPolicy.networks(["10.2.0.0/16"]))
    assert check_url("http://10.2.3.4/x", allowed).address == "10.2.3.4"
    with pytest.raises(UrlRefused):
        check_url("http://10.3.0.1/x", allowed)


def test_fetch_is_refused_by_default(server: str) -> None:
    with pytest.raises(UrlRefused, match="loopback"):
        fetch_url(f"{server}/img.png", FetchPolicy())


def test_fetch_when_allowed(server: str) -> None:
    fetched = fetch_url(f"{server}/img.png", LOCAL_ONLY)
    assert fetched.data == IMAGE and fetched.content_type == "image/png"
    assert fetch_url(f"{server}/img.png", FetchPolicy(allow_private=True)).data == IMAGE


def test_redirects_are_checked_again(server: str) -> None:
    followed = fetch_url(f"{server}/to-img", LOCAL_ONLY)
    assert followed.data == IMAGE and followed.final_url.endswith("/img.png")
    # 127.0.0.2 is loopback too, but not in the allowed network: refused after the redirect.
    with pytest.raises(UrlRefused, match=r"127\.0\.0\.2"):
        fetch_url(f"{server}/to-other-loopback", LOCAL_ONLY)
    with pytest.raises(UrlRefused, match=r"169\.254\.169\.254"):
        fetch_url(f"{server}/to-metadata", LOCAL_ONLY)
    with pytest.raises(FetchError, match="redirects"):
        fetch_url(f"{server}/loop", LOCAL_ONLY)


def test_size_limits(server: str) -> None:
    small = FetchPolicy(allowed_networks=LOCAL_ONLY.allowed_networks, max_bytes=4000)
    with pytest.raises(FetchError, match="limit"):
        fetch_url(f"{server}/big", small)
    with pytest.raises(FetchError, match="limit"):
        fetch_url(f"{server}/big-unannounced", small)
    assert len(fetch_url(f"{server}/big", LOCAL_ONLY).data) == 5000


def test_timeouts_and_errors(server: str) -> None:
    with pytest.raises(FetchError, match="timed out"):
        fetch_url(f"{server}/slow", LOCAL_ONLY)
    with pytest.raises(FetchError, match="404"):
        fetch_url(f"{server}/missing.png", LOCAL_ONLY)


def test_connection_goes_to_the_checked_address(server: str) -> None:
    # The name resolves (once) to the allowed address; the request carries the name only in the
    # Host header, so nothing resolves it again behind the guard's back.
    port = server.rsplit(":", 1)[1]

    def resolver(host: str, _port: int) -> list[str]:
        assert host == "images.internal.test"
        return ["127.0.0.1"]

    policy = FetchPolicy(
        allowed_networks=LOCAL_ONLY.allowed_networks, resolver=resolver, timeout=0.5
    )
    fetched = fetch_url(f"http://images.internal.test:{port}/host", policy)
    assert fetched.data == f"images.internal.test:{port}".encode()
