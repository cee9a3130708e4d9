"""Settings of the auth service: environment variables with the ``AUTH_`` prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.auth.scopes import KNOWN_SCOPES, format_scopes, unknown_scopes
from shared.contracts.auth import MAX_SECRET_LENGTH, NAME_PATTERN
from shared.lockout import LoginBackoff
from shared.service_auth import CALLERS, DEVELOPMENT_CLIENT_SECRETS, check_client_secret
from shared.settings import ServiceSettings

DEFAULT_DEV_PASSWORD = "demo-password"
MIN_PRODUCTION_SECRET_LENGTH = 12
# OWASP's minimum argon2id profile (t=2, m=19 MiB); anything cheaper is refused in production.
MIN_PRODUCTION_ARGON2_TIME_COST = 2
MIN_PRODUCTION_ARGON2_MEMORY_KIB = 19 * 1024
# Secrets set through the admin API or command, in every environment.
MIN_ADMIN_SECRET_LENGTH = 12


def _known_scopes(scopes: tuple[str, ...]) -> tuple[str, ...]:
    # A typo here would silently grant nothing; better to fail at startup.
    unknown = unknown_scopes(scopes)
    if unknown:
        raise ValueError(
            f"unknown scope(s) {format_scopes(unknown)}; known: {' '.join(KNOWN_SCOPES)}"
        )
    return scopes


def _non_empty(secret: SecretStr) -> SecretStr:
    value = secret.get_secret_value()
    if not value:
        raise ValueError("must not be empty")
    if len(value) > MAX_SECRET_LENGTH:
        raise ValueError(f"must be at most {MAX_SECRET_LENGTH} characters")
    return secret


class BootstrapUser(BaseModel):
    """A user created at first start when absent (an existing user is never overwritten)."""

    # Errors must never echo the input: it holds a password.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    username: str = Field(pattern=NAME_PATTERN)
    password: SecretStr
    scopes: tuple[str, ...] = ()

    _check_scopes = field_validator("scopes")(_known_scopes)
    _check_password = field_validator("password")(_non_empty)


class BootstrapClient(BaseModel):
    """A client (``client_credentials`` grant) created at first start when absent."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    client_id: str = Field(pattern=NAME_PATTERN)
    client_secret: SecretStr
    scopes: tuple[str, ...] = ()

    _check_scopes = field_validator("scopes")(_known_scopes)
    _check_secret = field_validator("client_secret")(_non_empty)


def _default_users() -> tuple[BootstrapUser, ...]:
    return (
        BootstrapUser(
            username="demo", password=SecretStr(DEFAULT_DEV_PASSWORD), scopes=KNOWN_SCOPES
        ),
    )


class AuthSettings(ServiceSettings):
    # hide_input_in_errors: a refused configuration is printed at startup and must not leak
    # the bootstrap passwords it was given.
    model_config = SettingsConfigDict(env_prefix="AUTH_", hide_input_in_errors=True)

    port: int = Field(8001, ge=1, le=65535)
    database_url: str = "sqlite:///var/auth/auth.db"
    # PEM RSA (2048+ bits) private key. Development creates it when missing; production requires it.
    private_key_path: Path = Path("var/auth/signing-key.pem")
    issuer: str = "crossmodal-auth"
    audience: str = "crossmodal-gateway"
    access_token_ttl_seconds: int = Field(900, ge=5, le=86400)
    # Users get a refresh token with each password login, rotated on every use; a family of
    # rotated tokens ends after the maximum lifetime however often it was refreshed.
    refresh_token_ttl_seconds: int = Field(14 * 86400, ge=60, le=90 * 86400)
    refresh_token_max_lifetime_seconds: int = Field(30 * 86400, ge=60, le=365 * 86400)
    # How long a retired signing key stays in the JWKS; None: the access-token lifetime plus
    # a 5-minute margin, so every token it signed expires before it is withdrawn.
    key_retention_seconds: int | None = Field(None, ge=60)
    # How often the key file is checked for a new key (a rotation or a swapped secret).
    key_check_interval_seconds: float = Field(1.0, gt=0, le=300)
    # JSON lists in the environment, e.g.
    # AUTH_BOOTSTRAP_USERS='[{"username": "alice", "password": "…", "scopes": ["search:text"]}]'.
    # The default (the "demo" user) is refused in production: set real users, or [] for none.
    bootstrap_users: tuple[BootstrapUser, ...] = Field(default_factory=_default_users)
    bootstrap_clients: tuple[BootstrapClient, ...] = ()
    # The client secrets of the calling services (shared/service_auth.py, CALLERS), which get
    # service tokens for the internal services; production refuses the development defaults.
    gateway_client_secret: SecretStr = SecretStr(DEVELOPMENT_CLIENT_SECRETS["gateway"])
    reconcile_client_secret: SecretStr = SecretStr(DEVELOPMENT_CLIENT_SECRETS["reconcile"])
    # A service token's lifetime; its holder refreshes it at three quarters of it.
    service_token_ttl_seconds: int = Field(300, ge=30, le=3600)
    # argon2id cost; the defaults are argon2-cffi's (RFC 9106 "low memory" profile). Tests lower them.
    argon2_time_cost: int = Field(3, ge=1, le=20)
    argon2_memory_kib: int = Field(65536, ge=64, le=4 * 1024 * 1024)
    # Failed password logins per account (shared/lockout.py), counted here too so that a caller
    # of /token that bypasses the gateway is limited as well, e.g.
    # AUTH_LOGIN_BACKOFF='{"free_failures": 5, "base_seconds": 1, "max_seconds": 900}'.
    login_backoff: LoginBackoff = LoginBackoff()
    # How many accounts' failures are kept in memory at most (about 200 bytes each).
    login_max_tracked_accounts: int = Field(50_000, ge=1000, le=1_000_000)

    @model_validator(mode="after")
    def _check(self) -> Self:
        names = [u.username for u in self.bootstrap_users]
        names += [c.client_id for c in self.bootstrap_clients]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"bootstrap user/client names must be unique: {', '.join(duplicates)}")
        if (
            self.key_retention_seconds is not None
            and self.key_retention_seconds < self.access_token_ttl_seconds
        ):
            raise ValueError(
                "AUTH_KEY_RETENTION_SECONDS must be at least AUTH_ACCESS_TOKEN_TTL_SECONDS, or "
                "tokens signed by a retired key would stop verifying before they expire"
            )
        refused = [
            why
            for caller, secret in self.client_secrets().items()
            if (
                why := check_client_secret(
                    caller, secret.get_secret_value(), production=self.is_production
                )
            )
        ]
        if refused:
            raise ValueError(
                "refusing to start: "
                + "; ".join(refused)
                + " (set AUTH_GATEWAY_CLIENT_SECRET and AUTH_RECONCILE_CLIENT_SECRET)"
            )
        if self.is_production:
            self._check_production()
        return self

    def client_secrets(self) -> dict[str, SecretStr]:
        """Each calling service's client secret, by client id."""
        return {caller: getattr(self, f"{caller}_client_secret") for caller in CALLERS}

    @property
    def effective_key_retention_seconds(self) -> int:
        if self.key_retention_seconds is not None:
            return self.key_retention_seconds
        return self.access_token_ttl_seconds + 300

    def _check_production(self) -> None:
        secrets = [(f"user {u.username!r}", u.password) for u in self.bootstrap_users]
        secrets += [(f"client {c.client_id!r}", c.client_secret) for c in self.bootstrap_clients]
        errors = []
        for who, secret in secrets:
            value = secret.get_secret_value()
            if value == DEFAULT_DEV_PASSWORD:
                errors.append(f"bootstrap {who} uses the default development password")
            elif len(value) < MIN_PRODUCTION_SECRET_LENGTH:
                errors.append(
                    f"bootstrap {who} has a password shorter than "
                    f"{MIN_PRODUCTION_SECRET_LENGTH} characters"
                )
        if self.argon2_time_cost < MIN_PRODUCTION_ARGON2_TIME_COST:
            errors.append(f"AUTH_ARGON2_TIME_COST must be >= {MIN_PRODUCTION_ARGON2_TIME_COST}")
        if self.argon2_memory_kib < MIN_PRODUCTION_ARGON2_MEMORY_KIB:
            errors.append(f"AUTH_ARGON2_MEMORY_KIB must be >= {MIN_PRODUCTION_ARGON2_MEMORY_KIB}")
        if errors:
            raise ValueError(
                "refusing to start in production: "
                + "; ".join(errors)
                + " (set AUTH_BOOTSTRAP_USERS / AUTH_BOOTSTRAP_CLIENTS to strong secrets, "
                "or [] to create none)"
            )
