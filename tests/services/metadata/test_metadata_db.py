"""Engine set-up: SQLite pragmas and folder creation, supported dialects, table creation."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from services.metadata.db import create_tables, make_engine


def test_sqlite_engine_creates_folder_and_sets_pragmas(tmp_path: Path) -> None:
    db_file = tmp_path / "nested" / "dir" / "metadata.db"
    engine = make_engine(f"sqlite:///{db_file}")
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert db_file.parent.is_dir()
        create_tables(engine)
        assert set(inspect(engine).get_table_names()) == {"collections", "items", "captions"}
        create_tables(engine)  # idempotent: a restart finds the tables in place
    finally:
        engine.dispose()


def test_unsupported_database_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported database"):
        make_engine("mysql://user@localhost/db")
