"""Settings of the metadata service (environment prefix ``METADATA_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.service_auth import InternalServiceSettings


class MetadataSettings(InternalServiceSettings):
    model_config = SettingsConfigDict(env_prefix="METADATA_", extra="ignore", frozen=True)

    port: int = Field(8004, ge=1, le=65535)
    # Any SQLAlchemy URL; SQLite and PostgreSQL (postgresql+psycopg://...) are supported.
    database_url: str = "sqlite:///var/metadata/metadata.db"
    image_dir: Path = Path("var/metadata/images")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    # Checked from the image header before anything is decoded (decompression bombs).
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_captions: int = Field(32, ge=0)
    max_caption_chars: int = Field(1000, ge=1)
    # Longer side of the thumbnails made at ingest (GET /items/{id}/image?size=thumb).
    thumbnail_size: int = Field(256, ge=16, le=2048)
    # Collection deletions: items removed per transaction, and how often this service looks
    # for deletions to purge (a restart, or another replica's, resumes them within that).
    purge_batch: int = Field(500, ge=1, le=10_000)
    purge_poll_seconds: float = Field(5.0, gt=0, le=3600)
    # glibc malloc arenas of the process (services/metadata/memory.py): with glibc's default (up
    # to 8 per core) free memory piles up in the arenas of the route threads. 0: glibc's default;
    # a MALLOC_ARENA_MAX environment variable takes precedence.
    malloc_arena_max: int = Field(2, ge=0, le=1024)
