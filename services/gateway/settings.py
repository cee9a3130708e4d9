"""Settings of the gateway: environment variables with the ``GATEWAY_`` prefix. Lists and maps
are JSON, e.g. ``GATEWAY_RATE_LIMITS='{"search:image": {"rate": 5, "burst": 10}}'``."""

from __future__ import annotations

import ipaddress
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from shared.lockout import LoginBackoff
from shared.service_auth import DEVELOPMENT_CLIENT_SECRETS, check_client_secret
from shared.settings import ServiceSettings

SCOPES: dict[str, str] = {
    "search:text": "Search images or captions by text",
    "search:image": "Search captions or images by image",
    "items:read": "Read items and their images",
    "items:write": "Add and delete items",
    "admin": "Administer principals, revocations and signing keys",
}
# Scopes whose requests change state: their security controls fail closed by default.
WRITE_SCOPES = frozenset({"items:write", "admin"})


class RateLimit(BaseModel):
    """A token bucket: ``burst`` requests at once, refilled at ``rate`` requests per second."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float = Field(gt=0, le=1_000_000)
    burst: int = Field(ge=1, le=1_000_000)


# Generous enough for a batch client on one token; tighten per deployment.
DEFAULT_RATE_LIMITS: dict[str, RateLimit] = {
    "search:text": RateLimit(rate=50, burst=100),
    "search:image": RateLimit(rate=20, burst=50),
    "items:read": RateLimit(rate=100, burst=200),
    "items:write": RateLimit(rate=20, burst=50),
    "admin": RateLimit(rate=5, burst=20),
}

DEFAULT_UPLOAD_TYPES = (
    "image/jpeg",
    "image/png",
    "image/gif",
    "image/webp",
    "image/bmp",
    "image/tiff",
    "image/avif",
)


class GatewaySettings(ServiceSettings):
    # "null" in the environment means None (e.g. GATEWAY_IP_RATE_LIMIT=null disables that limit).
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", extra="ignore", frozen=True, env_parse_none_str="null"
    )

    port: int = Field(8000, ge=1, le=65535)
    # Processes accepting on the port (the gateway keeps no state of its own: limits, cache and
    # leases are in Redis). One event loop saturates one core near 1,300 cached image searches
    # per second; set it to the cores the gateway may use. Kubernetes scales replicas instead.
    workers: int = Field(1, ge=1, le=64)

    auth_url: str = "http://127.0.0.1:8001"
    feature_url: str = "http://127.0.0.1:8002"
    retrieval_url: str = "http://127.0.0.1:8003"
    metadata_url: str = "http://127.0.0.1:8004"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis's requirepass, kept out of the URL so it never shows in logs or settings dumps; a
    # password written in the URL wins.
    redis_password: SecretStr | None = None

    # Per-call limits. Inference on a CPU is the slow step, so the feature service gets more.
    upstream_timeout_seconds: float = Field(5.0, gt=0, le=120)
    feature_timeout_seconds: float = Field(30.0, gt=0, le=300)
    redis_timeout_seconds: float = Field(0.5, gt=0, le=10)
    # Per-request budgets shared by every downstream call of one request: a search is answered
    # (or refused with a 503) within its budget; other requests (item writes) get more.
    search_timeout_seconds: float = Field(2.0, gt=0, le=120)
    request_timeout_seconds: float = Field(30.0, gt=0, le=600)

    # Circuit breaker per downstream service: open after this many failures in a row, then one
    # probe call after the cool-down. Redis gets its own, shorter cool-down.
    breaker_failure_threshold: int = Field(5, ge=1, le=1000)
    breaker_reset_seconds: float = Field(5.0, gt=0, le=600)
    redis_retry_seconds: float = Field(2.0, gt=0, le=600)

    # The gateway's own client secret (client id "gateway"), for its service tokens to the
    # internal services (shared/service_tokens.py); production refuses the development default.
    client_secret: SecretStr = SecretStr(DEVELOPMENT_CLIENT_SECRETS["gateway"])

    jwt_issuer: str = "crossmodal-auth"
    jwt_audience: str = "crossmodal-gateway"
    jwks_cache_seconds: float = Field(300.0, gt=0, le=86400)
    jwks_min_refresh_seconds: float = Field(5.0, ge=0, le=3600)
    # The revocation list is polled from the auth service; past max staleness (auth away) the
    # fail-open settings below decide.
    revocation_poll_seconds: float = Field(2.0, gt=0, le=300)
    # Background work (services/gateway/maintenance.py): collection deletions left unfinished,
    # every maintenance_interval_seconds; drift between metadata and retrieval repaired, every
    # reconcile_interval_seconds (0: never) by one replica, at most reconcile_max_items items
    # indexed again per collection and round; pending items older than reconcile_stuck_seconds
    # are stuck, failed items are retried while they failed fewer than reconcile_retry_attempts
    # times.
    maintenance_interval_seconds: float = Field(10.0, gt=0, le=3600)
    reconcile_interval_seconds: float = Field(300.0, ge=0, le=86400)
    reconcile_stuck_seconds: float = Field(600.0, gt=0, le=86400)
    reconcile_max_items: int = Field(100, ge=1, le=10_000)
    reconcile_retry_attempts: int = Field(3, ge=0, le=100)
    revocation_max_staleness_seconds: float = Field(60.0, gt=0, le=86400)

    # Token buckets in Redis: per principal and route scope, per client IP (every request with
    # a scope), and per client IP on the token endpoints (password guessing). null disables one.
    rate_limit_enabled: bool = True
    rate_limits: dict[str, RateLimit] = Field(default_factory=lambda: dict(DEFAULT_RATE_LIMITS))
    ip_rate_limit: RateLimit | None = RateLimit(rate=200, burst=400)
    token_rate_limit: RateLimit | None = RateLimit(rate=2, burst=30)
    # Failed password logins per account, from every address (shared/lockout.py), e.g.
    # GATEWAY_LOGIN_BACKOFF='{"free_failures": 5, "base_seconds": 1, "max_seconds": 900}'.
    login_backoff: LoginBackoff = LoginBackoff()
    # The client address of the limits is the TCP peer. Only a peer listed here (addresses or
    # networks of the reverse proxies in front, e.g. '["10.244.0.0/16"]') may name another one
    # in X-Forwarded-For; by default none may.
    trusted_proxies: tuple[str, ...] = ()
    # When a control cannot be checked (Redis down for the rate limiter, a stale revocation
    # list): let reads through, refuse writes (items:write, admin) with a 503.
    fail_open_reads: bool = True
    fail_open_writes: bool = False

    cache_ttl_seconds: int = Field(300, ge=0, le=86400)
    embedding_cache_ttl_seconds: int = Field(3600, ge=0, le=30 * 86400)
    # How long the feature service's model id (part of every embedding key) is trusted.
    model_id_ttl_seconds: float = Field(30.0, gt=0, le=3600)
    # multimodal_cache_hit_ratio covers the lookups of this last window.
    cache_window_seconds: int = Field(300, ge=10, le=86400)
    # Keys of several deployments (or test runs) sharing one Redis never collide.
    cache_prefix: str = Field("crossmodal", min_length=1, max_length=64)

    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # Whole request bodies; None: the upload limit plus 1 MiB for the form around it.
    max_request_bytes: int | None = Field(None, ge=1024)
    max_json_bytes: int = Field(64 * 1024, ge=1024)
    allowed_upload_types: tuple[str, ...] = DEFAULT_UPLOAD_TYPES
    max_top_k: int = Field(100, ge=1, le=1000)

    # Browsers on these origins may call the API ("*" for any, without credentials).
    cors_allow_origins: tuple[str, ...] = ()
    cors_allow_credentials: bool = False

    @field_validator("rate_limits", mode="before")
    @classmethod
    def _merge_rate_limits(cls, value: Any) -> Any:
        # A partial map overrides those scopes only; the others keep their defaults.
        if isinstance(value, dict):
            return {**DEFAULT_RATE_LIMITS, **value}
        return value

    @field_validator("rate_limits")
    @classmethod
    def _known_scopes(cls, value: dict[str, RateLimit]) -> dict[str, RateLimit]:
        unknown = sorted(set(value) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown scope(s) {unknown}; known: {sorted(SCOPES)}")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        proxies = tuple(entry.strip() for entry in value)
        for entry in proxies:
            if entry == "*":
                raise ValueError(
                    "trusted proxies must be addresses or networks, not '*': any client could "
                    "then choose the address that its requests are limited by"
                )
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted proxy {entry!r} is not an IP address or network"
                ) from None
            if network.prefixlen == 0:
                raise ValueError(f"trusted proxy {entry!r} is every address, as '*' would be")
        return proxies

    @field_validator("allowed_upload_types")
    @classmethod
    def _image_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        types = tuple(t.strip().lower() for t in value)
        if not types or any(not t.startswith("image/") for t in types):
            raise ValueError("allowed upload types must be image/* media types")
        return types

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.cors_allow_credentials and "*" in self.cors_allow_origins:
            raise ValueError("CORS credentials cannot be allowed for every origin ('*')")
        refused = check_client_secret(
            "gateway", self.client_secret.get_secret_value(), production=self.is_production
        )
        if refused:
            raise ValueError(f"refusing to start: {refused} (GATEWAY_CLIENT_SECRET)")
        return self

    @property
    def effective_max_request_bytes(self) -> int:
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return self.max_upload_bytes + 1024 * 1024
