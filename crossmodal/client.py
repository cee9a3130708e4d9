"""A small synchronous client of the public gateway API, and the local token store behind
``crossmodal login``. Used by the command-line tool, the ingestion pipeline and the benchmark."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from shared.contracts.metadata import MAX_HASHES

DEFAULT_GATEWAY = "http://127.0.0.1:8000"
_ITEM_IN_DETAIL = re.compile(r"\bitem (\d+)\b")


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def sniff_image_type(data: bytes, default: str = "image/jpeg") -> str:
    """The media type of ``data`` from its first bytes. Uploads must declare an image type the
    gateway accepts; the services detect the real format from the bytes anyway."""
    for signature, media_type in _SIGNATURES:
        if data.startswith(signature):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "image/avif"
    return default


class GatewayError(Exception):
    """A problem answer of the gateway (``status``, ``code``, ``detail``), or a transport failure
    (``status`` None, code ``unreachable``/``timeout``)."""

    def __init__(
        self,
        status: int | None,
        code: str,
        detail: str,
        *,
        body: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {detail}" if status is None else f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.body = body or {}
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Worth trying again later: overload, an unavailable service, a lost connection."""
        return self.status is None or self.status in (408, 425, 429, 500, 502, 503, 504)

    @property
    def item_id(self) -> int | None:
        """The existing item a 409 duplicate names (the body's ``item_id``, or its detail)."""
        if isinstance(self.body.get("item_id"), int):
            return int(self.body["item_id"])
        match = _ITEM_IN_DETAIL.search(self.detail)
        return int(match.group(1)) if match else None


def _error_from(response: httpx.Response) -> GatewayError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    retry_after = None
    header = response.headers.get("retry-after", "")
    if header.replace(".", "", 1).isdigit():
        retry_after = float(header)
    code = str(body.get("code") or body.get("error") or f"http_{response.status_code}")
    detail = str(body.get("detail") or body.get("error_description") or response.text[:200] or code)
    return GatewayError(response.status_code, code, detail, body=body, retry_after=retry_after)


LOGIN_REQUIRED = "login_required"


@dataclass(frozen=True)
class Token:
    access_token: str
    expires_at: float | None  # UNIX time
    # The password grant's refresh token: a long run renews its access token with it.
    refresh_token: str | None = None
    lifetime: float | None = None  # seconds the access token was issued for

    @property
    def expired(self) -> bool:
        # Renewed a quarter of its life (at most a minute) early: a token about to expire would
        # fail mid-request.
        slack = 60.0 if self.lifetime is None else min(60.0, self.lifetime / 4)
        return self.expires_at is not None and time.time() > self.expires_at - slack


class TokenSession:
    """The access token of one command, shared by its threads: renewed with the refresh token
    before it expires or once the gateway refuses it, one renewal at a time (the auth service
    rotates refresh tokens, and two renewals with the same one would revoke them all), and each
    new pair saved at once, since the refresh token saved before is spent."""

    def __init__(self, gateway: str, token: Token, store: TokenStore | None = None) -> None:
        self.gateway = gateway
        self._token = token
        self._store = store
        self._lock = threading.Lock()

    def access_token(self, client: GatewayClient) -> str:
        token = self._token
        if token.expired and token.refresh_token is not None:
            token = self._renew(client, token.access_token)
        return token.access_token

    def renew_refused(self, client: GatewayClient, refused: str) -> bool:
        """After a 401 for ``refused``: True once a new token is there to try."""
        if self._token.refresh_token is None:
            return False
        return self._renew(client, refused).access_token != refused

    def _renew(self, client: GatewayClient, stale: str) -> Token:
        with self._lock:
            current = self._token
            if current.access_token != stale or current.refresh_token is None:
                return current  # another thread renewed it meanwhile
            try:
                renewed = client.refresh_token(current.refresh_token)
            except GatewayError as exc:
                if exc.status in (400, 401):  # the refresh token is spent, revoked or expired
                    raise login_required(self.gateway, exc.detail) from None
                raise
            self._token = renewed
            if self._store is not None:
                self._store.save(self.gateway, renewed)
            return renewed


def login_required(gateway: str, why: str) -> GatewayError:
    return GatewayError(401, LOGIN_REQUIRED, f"{why}; run `crossmodal login --gateway {gateway}`")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class GatewayClient:
    """The gateway's public endpoints. Thread-safe (one ``httpx.Client`` shared by the
    ingestion workers)."""

    def __init__(
        self,
        base_url: str = DEFAULT_GATEWAY,
        *,
        token: str | None = None,
        session: TokenSession | None = None,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        """``token``: used as it is; ``session``: renewed as it nears its expiry."""
        self.base_url = base_url.rstrip("/")
        self._session = session
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Embedding on a CPU is the slow step behind POST /items: a generous read timeout.
        self._http = http or httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=5.0),
            transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )
        self._headers = headers

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, *, authenticated: bool = True, **kwargs: Any
    ) -> httpx.Response:
        headers = {**self._headers, **(kwargs.pop("headers", None) or {})} if authenticated else {}
        session = self._session if authenticated else None
        if session is None:
            return self._send(method, path, headers, kwargs)
        token = session.access_token(self)
        response = self._send(method, path, headers | _bearer(token), kwargs, refused_ok=True)
        if response.status_code == 401:
            # Expired or revoked since it was checked: renewed once, the request sent again (a
            # 401 is answered before the gateway does anything).
            if not session.renew_refused(self, token):
                raise login_required(self.base_url, _error_from(response).detail)
            token = session.access_token(self)
            response = self._send(method, path, headers | _bearer(token), kwargs)
        return response

    def _send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        kwargs: dict[str, Any],
        *,
        refused_ok: bool = False,
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.TimeoutException as exc:
            raise GatewayError(None, "timeout", f"{method} {path} timed out") from exc
        except httpx.TransportError as exc:
            raise GatewayError(None, "unreachable", f"cannot reach {self.base_url}: {exc}") from exc
        if response.status_code >= 400 and not (refused_ok and response.status_code == 401):
            raise _error_from(response)
        return response

    # --- auth ---------------------------------------------------------------------------

    def password_token(self, username: str, password: str, scope: str | None = None) -> Token:
        form = {"grant_type": "password", "username": username, "password": password}
        if scope:
            form["scope"] = scope
        return self._token(form)

    def client_token(self, client_id: str, client_secret: str, scope: str | None = None) -> Token:
        form = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": client_secret,
        }
        if scope:
            form["scope"] = scope
        return self._token(form)

    def refresh_token(self, refresh_token: str) -> Token:
        """The next access and refresh tokens (the one given is spent by this call)."""
        return self._token({"grant_type": "refresh_token", "refresh_token": refresh_token})

    def _token(self, form: dict[str, str]) -> Token:
        body = self.request("POST", "/auth/token", data=form, authenticated=False).json()
        expires_in = body.get("expires_in")
        lifetime = float(expires_in) if expires_in else None
        return Token(
            body["access_token"],
            time.time() + lifetime if lifetime else None,
            refresh_token=body.get("refresh_token"),
            lifetime=lifetime,
        )

    # --- items --------------------------------------------------------------------------

    def add_item(
        self,
        collection: str,
        image: bytes,
        *,
        filename: str = "image",
        content_type: str | None = None,
        captions: list[str] | tuple[str, ...] = (),
        attributes: dict[str, Any] | None = None,
        tags: list[str] | tuple[str, ...] = (),
        source_uri: str | None = None,
    ) -> dict[str, Any]:
        """POST /items: the indexed item. A duplicate raises ``GatewayError`` 409
        ``duplicate_item`` (or ``duplicate_pending``)."""
        form: dict[str, Any] = {"collection": collection, "caption": list(captions)}
        if attributes:
            form["attributes"] = json.dumps(attributes, ensure_ascii=False)
        if tags:
            form["tag"] = list(tags)
        if source_uri:
            form["source_uri"] = source_uri
        media_type = content_type or sniff_image_type(image)
        response = self.request(
            "POST", "/items", data=form, files={"image": (filename, image, media_type)}
        )
        return response.json()  # type: ignore[no-any-return]

    def merge_item(
        self,
        item_id: int,
        *,
        captions: list[str] | tuple[str, ...] = (),
        tags: list[str] | tuple[str, ...] = (),
        attributes: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """POST /items/{id}/merge: what a duplicate of the item brings, added to it. The answer
        lists what was added and the attributes the item kept (``conflicts``)."""
        body = {"captions": list(captions), "tags": list(tags), "attributes": attributes or {}}
        response = self.request("POST", f"/items/{item_id}/merge", json=body)
        return response.json()  # type: ignore[no-any-return]

    def get_item(self, item_id: int) -> dict[str, Any]:
        return self.request("GET", f"/items/{item_id}").json()  # type: ignore[no-any-return]

    def find_hashes(self, collection: str, hashes: list[str]) -> dict[str, dict[str, Any]] | None:
        """Which image hashes the collection already holds (``{sha256: {"id", "status"}}``), or
        None when the gateway does not offer the lookup (older gateways)."""
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(hashes), MAX_HASHES):
            try:
                response = self.request(
                    "POST",
                    f"/collections/{collection}/hashes",
                    json={"sha256": hashes[start : start + MAX_HASHES]},
                )
            except GatewayError as exc:
                if exc.status == 404 and exc.code == "collection_not_found":
                    return {}
                if exc.status in (404, 405):
                    return None
                raise
            found |= {entry["sha256"]: entry for entry in response.json()["items"]}
        return found

    # --- search -------------------------------------------------------------------------

    def search_text(
        self,
        query: str,
        *,
        collection: str,
        top_k: int = 10,
        target: str | None = None,
        filters: Any = None,
        mode: str = "vector",
    ) -> dict[str, Any]:
        """``target`` None: the gateway's default (images)."""
        body: dict[str, Any] = {"query": query, "collection": collection, "top_k": top_k}
        if target is not None:
            body["target"] = target
        if filters is not None:
            body["filters"] = filters
        if mode != "vector":  # only sent when asked: older gateways refuse unknown fields
            body["mode"] = mode
        return self.request("POST", "/search/text", json=body).json()  # type: ignore[no-any-return]

    def search_image(
        self,
        image: bytes,
        *,
        collection: str,
        filename: str = "query",
        content_type: str | None = None,
        top_k: int = 10,
        target: str | None = None,
        filters: Any = None,
    ) -> dict[str, Any]:
        """``target`` None: the gateway's default (captions)."""
        form: dict[str, Any] = {"collection": collection, "top_k": str(top_k)}
        if target is not None:
            form["target"] = target
        if filters is not None:
            form["filters"] = json.dumps(filters)
        media_type = content_type or sniff_image_type(image)
        response = self.request(
            "POST", "/search/image", data=form, files={"image": (filename, image, media_type)}
        )
        return response.json()  # type: ignore[no-any-return]

    # --- collections --------------------------------------------------------------------

    def collections(self) -> list[dict[str, Any]]:
        return self.request("GET", "/collections").json()["collections"]  # type: ignore[no-any-return]

    def collection(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/collections/{name}").json()  # type: ignore[no-any-return]

    def create_collection(
        self,
        name: str,
        *,
        model_id: str | None = None,
        index_factory: str | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if model_id:
            body["model_id"] = model_id
        if index_factory:
            body["index"] = {"factory": index_factory}
        if description:
            body["description"] = description
        return self.request("POST", "/collections", json=body).json()  # type: ignore[no-any-return]

    def delete_collection(
        self, name: str, *, wait: bool = True, timeout: float = 600.0
    ) -> dict[str, Any]:
        """Delete the collection: the deletion (a job; docs/metadata.md), followed until it is
        ``done`` (its name free again) unless ``wait`` is false or ``timeout`` passes."""
        deletion: dict[str, Any] = self.request("DELETE", f"/collections/{name}").json()
        deadline = time.monotonic() + timeout
        while wait and deletion["state"] != "done" and time.monotonic() < deadline:
            time.sleep(0.2)
            deletion = self.request("GET", f"/deletions/{deletion['id']}").json()
        return deletion


# --- the token store ---------------------------------------------------------------------------


def config_dir() -> Path:
    explicit = os.environ.get("CROSSMODAL_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "crossmodal"


class TokenStore:
    """Tokens by gateway URL in ``credentials.json`` (mode 0600) under ``config_dir()``."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_dir() / "credentials.json"

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def load(self, gateway: str) -> Token | None:
        entry = self._read().get(gateway.rstrip("/"))
        if not isinstance(entry, dict) or not entry.get("access_token"):
            return None
        return Token(
            str(entry["access_token"]),
            entry.get("expires_at"),
            refresh_token=entry.get("refresh_token"),
            lifetime=entry.get("lifetime"),
        )

    def save(self, gateway: str, token: Token) -> None:
        data = self._read()
        data[gateway.rstrip("/")] = {
            "access_token": token.access_token,
            "expires_at": token.expires_at,
            "refresh_token": token.refresh_token,
            "lifetime": token.lifetime,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        # Created 0600 from the start: a token is a password for its lifetime.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
        os.replace(tmp, self.path)

    def forget(self, gateway: str) -> bool:
        data = self._read()
        if data.pop(gateway.rstrip("/"), None) is None:
            return False
        fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
        return True
