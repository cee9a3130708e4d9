"""Settings common to every service. Each service subclasses ``ServiceSettings`` with its own
environment prefix (``GATEWAY_``, ``AUTH_``, ``FEATURE_``, ``RETRIEVAL_``, ``METADATA_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Secrets a container runtime mounts as files named after their variable (docker compose
# `secrets:`, e.g. /run/secrets/AUTH_GATEWAY_CLIENT_SECRET); the environment wins over them.
SECRETS_DIR = Path("/run/secrets")


class ServiceSettings(BaseSettings):
    # Only where the directory exists: pydantic-settings warns about a missing one.
    model_config = SettingsConfigDict(
        extra="ignore", frozen=True, secrets_dir=SECRETS_DIR if SECRETS_DIR.is_dir() else None
    )

    environment: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # A port of its own for the scrape: /metrics alone, no token, for a network policy to open
    # to the monitoring system only. /metrics stays on the main port as well.
    metrics_port: int | None = Field(None, ge=1, le=65535)

    @property
    def is_production(self) -> bool:
        return self.environment == "production"
