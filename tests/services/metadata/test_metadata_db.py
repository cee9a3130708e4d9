"""Engine set-up and schema migrations: SQLite pragmas, supported dialects, the migrations against
the models on SQLite and PostgreSQL, and upgrading a database made before migrations existed."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from services.metadata.db import (
    LEGACY_REVISION,
    alembic_config,
    current_revision,
    include_name,
    include_object_for,
    make_engine,
    upgrade,
)
from services.metadata.models import Base
from tests.services.metadata.conftest import POSTGRES_URL

HEAD = "0003"


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with nothing in it: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    schema = f"metadata_mig_{uuid.uuid4().hex[:12]}"
    base = make_url(POSTGRES_URL).update_query_dict({"connect_timeout": "5"})
    admin = create_engine(base, poolclass=NullPool)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = base.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


def schema_differences(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection, warnings.catch_warnings():
            # SQLite cannot reflect expression indexes; alembic warns and skips them.
            warnings.simplefilter("ignore", UserWarning)
            context = MigrationContext.configure(
                connection,
                opts={
                    "include_name": include_name,
                    "include_object": include_object_for(connection.dialect.name),
                    "compare_type": True,
                    "compare_server_default": False,
                },
            )
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_sqlite_engine_creates_folder_and_sets_pragmas(tmp_path: Path) -> None:
    db_file = tmp_path / "nested" / "dir" / "metadata.db"
    engine = make_engine(f"sqlite:///{db_file}")
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert db_file.parent.is_dir()
    finally:
        engine.dispose()


def test_unsupported_database_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported database"):
        make_engine("mysql://user@localhost/db")


def test_migrations_create_the_schema_of_the_models(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == HEAD
        upgrade(engine)  # idempotent: a restart finds the schema in place
        assert current_revision(engine) == HEAD
        tables = set(inspect(engine).get_table_names())
        assert {"collections", "items", "captions", "item_tags", "alembic_version"} <= tables
        if engine.dialect.name == "sqlite":
            assert {"items_fts", "captions_fts"} <= tables
    finally:
        engine.dispose()
    assert schema_differences(empty_database_url) == []


def test_schema_comparison_notices_a_difference(empty_database_url: str) -> None:
    # The comparison above could pass vacuously; a missing column must show up in it.
    engine = make_engine(empty_database_url)
    try:
        upgrade(engine)
        with engine.begin() as connection:
            connection.execute(text("DROP INDEX ix_item_tags_tag"))
    finally:
        engine.dispose()
    differences = schema_differences(empty_database_url)
    assert [d[0] for d in differences] == ["add_index"]  # type: ignore[index]


def test_downgrade_and_upgrade_again(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    try:
        upgrade(engine)
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), LEGACY_REVISION)
        assert current_revision(engine) == LEGACY_REVISION
        assert "item_tags" not in inspect(engine).get_table_names()
        upgrade(engine)
        assert current_revision(engine) == HEAD
    finally:
        engine.dispose()
    assert schema_differences(empty_database_url) == []


def test_a_database_from_before_migrations_is_upgraded_in_place(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    now = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    try:
        # The old service's create_all schema is revision 0001 without alembic's version table.
        upgrade(engine, LEGACY_REVISION)
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE alembic_version"))
            connection.execute(
                text("INSERT INTO collections (name, created_at) VALUES ('old', :now)"),
                {"now": now},
            )
            connection.execute(
                text(
                    "INSERT INTO items (id, collection, status, attributes, image_sha256, "
                    "content_type, created_at, updated_at) VALUES (7, 'old', 'indexed', "
                    ":attributes, :sha, 'image/png', :now, :now)"
                ),
                {"attributes": '{"colour": "red"}', "sha": "a" * 64, "now": now},
            )
            connection.execute(
                text(
                    "INSERT INTO captions (id, item_id, position, text) VALUES "
                    "(70, 7, 0, 'a Lighthouse at dusk'), (71, 7, 1, 'coastal scene')"
                )
            )
        assert current_revision(engine) is None

        upgrade(engine)

        assert current_revision(engine) == HEAD
        with engine.connect() as connection:
            row = connection.execute(
                text("SELECT search_text, attempts, source_uri FROM items WHERE id = 7")
            ).one()
            assert "lighthouse" in row.search_text.lower()
            assert "coastal scene" in row.search_text
            assert row.attempts == 0 and row.source_uri is None
            index = connection.execute(
                text("SELECT index_settings FROM collections WHERE name = 'old'")
            ).scalar()
            assert index in ({}, "{}")
            # The rows written before the migration are in the full-text index too.
            if engine.dialect.name == "sqlite":
                found = connection.execute(
                    text("SELECT rowid FROM captions_fts WHERE captions_fts MATCH 'lighthouse'")
                ).all()
                assert found == [(70,)]
                found = connection.execute(
                    text("SELECT rowid FROM items_fts WHERE items_fts MATCH 'coastal'")
                ).all()
                assert found == [(7,)]
            else:
                found = connection.execute(
                    text(
                        "SELECT id FROM items WHERE to_tsvector('simple'::regconfig, search_text)"
                        " @@ to_tsquery('simple'::regconfig, 'lighthouse')"
                    )
                ).all()
                assert found == [(7,)]
            assert connection.execute(text("SELECT count(*) FROM captions")).scalar() == 2
        # The rebuilt tables keep their constraints, and (SQLite) never reuse a deleted id.
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(text("UPDATE items SET status = 'bogus' WHERE id = 7"))
        if engine.dialect.name == "sqlite":
            with engine.connect() as connection:
                ddl = connection.execute(
                    text(
                        "SELECT group_concat(sql, ' ') FROM sqlite_master WHERE name IN "
                        "('items', 'captions')"
                    )
                ).scalar()
            assert ddl.count("AUTOINCREMENT") == 2
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM captions WHERE id = 71"))
            connection.execute(
                text("INSERT INTO captions (item_id, position, text) VALUES (7, 5, 'new')")
            )
            new_id = connection.execute(text("SELECT max(id) FROM captions")).scalar()
        assert new_id != 71
    finally:
        engine.dispose()
    assert schema_differences(empty_database_url) == []
