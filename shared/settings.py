"""Settings common to every service. Each service subclasses ``ServiceSettings`` with its own
environment prefix (``GATEWAY_``, ``AUTH_``, ``FEATURE_``, ``RETRIEVAL_``, ``METADATA_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    environment: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def is_production(self) -> bool:
        return self.environment == "production"
