from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", frozen=True)

    port: int = Field(8000, ge=1, le=65535)

    auth_url: str = "http://127.0.0.1:8001"
    feature_url: str = "http://127.0.0.1:8002"
    retrieval_url: str = "http://127.0.0.1:8003"
    metadata_url: str = "http://127.0.0.1:8004"
    redis_url: str = "redis://127.0.0.1:6379/0"

    # Per-call budgets. Inference on a CPU is the slow step, so the feature service gets more.
    upstream_timeout_seconds: float = Field(5.0, gt=0, le=120)
    feature_timeout_seconds: float = Field(30.0, gt=0, le=300)
    redis_timeout_seconds: float = Field(0.5, gt=0, le=10)

    jwt_issuer: str = "crossmodal-auth"
    jwt_audience: str = "crossmodal-gateway"

    cache_ttl_seconds: int = Field(300, ge=0, le=86400)
    # Keys of several deployments (or test runs) sharing one Redis never collide.
    cache_prefix: str = Field("crossmodal", min_length=1, max_length=64)

    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_top_k: int = Field(100, ge=1, le=1000)
