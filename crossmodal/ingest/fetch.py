"""Reading an image's bytes: a local file, or an http(s) URL behind a guard against server-side
request forgery (SSRF).

A manifest is untrusted input: a URL in it could point the indexer at a cloud metadata endpoint
(169.254.169.254), a database on localhost or an intranet host, and the bytes would end up stored
and served. So, for every URL and again for every redirect:

- only ``http`` and ``https``;
- the host is resolved once and every address it resolves to must be public: loopback, private,
  link-local, carrier-grade NAT, multicast, reserved, unspecified and documentation ranges are
  refused (IPv4-mapped IPv6 addresses are judged by their IPv4 address) unless the address is in
  ``allowed_networks`` or ``allow_private`` is set;
- the connection goes to the address that was checked (the request names the host only in the
  ``Host`` header and TLS SNI), so a second, different DNS answer cannot slip in (DNS rebinding);
- redirects are followed by hand, at most ``max_redirects``, each target checked as above;
- the body is read in chunks and abandoned past ``max_bytes``; connect, read and whole-download
  timeouts apply.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class FetchError(Exception):
    """The image could not be read (missing file, HTTP error, too large, timed out)."""


class UrlRefused(FetchError):
    """The URL was refused by the SSRF guard."""


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchError(f"cannot resolve {host!r}: {exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = 10.0  # connect and per-read
    total_timeout: float = 60.0  # the whole download, redirects included
    max_redirects: int = 5
    resolver: Resolver = system_resolver

    @staticmethod
    def networks(specs: Sequence[str]) -> tuple[IPNetwork, ...]:
        """``["10.1.0.0/16", "127.0.0.1"]`` → networks (a bare address is a /32 or /128)."""
        return tuple(ipaddress.ip_network(spec, strict=False) for spec in specs)


def address_problem(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address, or None if it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address_problem(address.ipv4_mapped)
    for label, flag in (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if flag:
            return label
    if not address.is_global:  # carrier-grade NAT, documentation, benchmarking, ...
        return "not globally routable"
    return None


def check_address(address: IPAddress, policy: FetchPolicy) -> None:
    if policy.allow_private or any(address in net for net in policy.allowed_networks):
        return
    problem = address_problem(address)
    if problem:
        raise UrlRefused(
            f"{address} is a {problem} address; refused (allow it with --allow-private-urls "
            "or --allow-network)"
        )


@dataclass(frozen=True)
class Target:
    """A URL checked by the guard, with the address to connect to."""

    url: str
    host: str
    port: int
    address: str


def check_url(url: str, policy: FetchPolicy) -> Target:
    """Resolve and check ``url``; raises ``UrlRefused``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UrlRefused(f"only http and https URLs are fetched, not {parts.scheme or 'none'!r}")
    if parts.username or parts.password:
        raise UrlRefused("URLs with credentials are refused")
    host = parts.hostname
    if not host:
        raise UrlRefused(f"{url!r} has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UrlRefused(f"{url!r} has an invalid port") from None
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    candidates = [str(literal)] if literal is not None else policy.resolver(host, port)
    if not candidates:
        raise FetchError(f"{host!r} resolves to no address")
    # Every answer must pass: a name that resolves to a public and a private address is refused,
    # rather than trusting which one the connection would have used.
    for candidate in candidates:
        check_address(ipaddress.ip_address(candidate), policy)
    return Target(url, host, port, candidates[0])


def _pinned_url(target: Target) -> str:
    parts = urlsplit(target.url)
    address = ipaddress.ip_address(target.address)
    host = f"[{address}]" if address.version == 6 else str(address)
    return urlunsplit((parts.scheme, f"{host}:{target.port}", parts.path or "/", parts.query, ""))


def _host_header(target: Target) -> str:
    default = 443 if target.url.startswith("https:") else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == default else f"{host}:{target.port}"


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str
    final_url: str


def fetch_url(url: str, policy: FetchPolicy, client: httpx.Client | None = None) -> Fetched:
    """GET ``url`` under ``policy``. Raises ``UrlRefused`` or ``FetchError``."""
    own = client is None
    http = client or httpx.Client(
        timeout=httpx.Timeout(policy.timeout), follow_redirects=False, trust_env=False
    )
    deadline = time.monotonic() + policy.total_timeout
    try:
        current = url
        for _ in range(policy.max_redirects + 1):
            target = check_url(current, policy)
            request = http.build_request(
                "GET",
                _pinned_url(target),
                headers={"Host": _host_header(target), "Accept": "image/*"},
                # TLS: SNI and certificate checks against the host name, not the address.
                extensions={"sni_hostname": target.host},
                timeout=policy.timeout,
            )
            try:
                response = http.send(request, stream=True, follow_redirects=False)
            except httpx.TimeoutException:
                raise FetchError(f"{current} timed out") from None
            except httpx.HTTPError as exc:
                raise FetchError(f"{current}: {exc}") from None
            try:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    current = urljoin(current, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise FetchError(f"{current} answered HTTP {response.status_code}")
                return Fetched(
                    _read_body(response, policy, deadline, current), _type(response), current
                )
            finally:
                response.close()
        raise FetchError(f"{url}: more than {policy.max_redirects} redirects")
    finally:
        if own:
            http.close()


def _type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "application/octet-stream").split(";")[0].strip()


def _read_body(response: httpx.Response, policy: FetchPolicy, deadline: float, url: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise FetchError(f"{url} is {declared} bytes; the limit is {policy.max_bytes}")
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > policy.max_bytes:
                raise FetchError(f"{url} is larger than the {policy.max_bytes}-byte limit")
            if time.monotonic() > deadline:
                raise FetchError(f"{url} took longer than {policy.total_timeout:.0f}s")
            chunks.append(chunk)
    except httpx.TimeoutException:
        raise FetchError(f"{url} timed out") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"{url}: {exc}") from None
    return b"".join(chunks)


def read_file(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise FetchError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise FetchError(f"{path} is larger than the {max_bytes}-byte limit")
    return data
