"""Fixtures for the metadata service tests: every API test runs against SQLite (a temporary file)
and PostgreSQL (a schema of this session's own, emptied before each test and dropped at the end).
PostgreSQL being unreachable is a test failure, not a skip: CI provides it. Point
METADATA_TEST_POSTGRES_URL elsewhere to use another server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from services.metadata.app import create_app
from services.metadata.db import make_engine, upgrade
from services.metadata.settings import MetadataSettings
from tests.service_tokens import KEYS, service_headers

POSTGRES_URL = os.environ.get(
    "METADATA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A URL whose connections use a schema of their own, migrated to the newest revision; the
    schema is dropped at the end of the session, so runs never see each other's rows."""
    schema = f"metadata_test_{uuid.uuid4().hex[:12]}"
    base = make_url(POSTGRES_URL).update_query_dict({"connect_timeout": "5"})
    admin = create_engine(base, poolclass=NullPool)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        # search_path makes the service create and use its tables inside that schema.
        url = base.update_query_dict({"options": f"-csearch_path={schema}"})
        engine = make_engine(url.render_as_string(hide_password=False))
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        yield url.render_as_string(hide_password=False)
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'metadata.db'}"
    url: str = request.getfixturevalue("postgres_url")
    # Emptying the tables (and restarting ids) is much cheaper than a schema per test.
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "TRUNCATE item_tags, captions, items, collections, collection_deletions "
                    "RESTART IDENTITY"
                )
            )
    finally:
        engine.dispose()
    return url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> MetadataSettings:
    return MetadataSettings(
        database_url=database_url,
        image_dir=tmp_path / "images",
        max_image_bytes=64 * 1024,
        max_captions=4,
        max_caption_chars=50,
        # Purges run when a deletion's vectors are reported dropped, or when a test asks.
        purge_poll_seconds=3600,
    )


@pytest.fixture
def client(settings: MetadataSettings) -> Iterator[TestClient]:
    with TestClient(
        create_app(settings, token_keys=KEYS), headers=service_headers("metadata")
    ) as test_client:
        yield test_client
