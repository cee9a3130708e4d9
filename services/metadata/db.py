"""Engine creation for SQLite and PostgreSQL, and table creation at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from services.metadata.models import Base

SUPPORTED_DIALECTS = frozenset({"sqlite", "postgresql"})


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # SQLite ignores foreign keys (and so ON DELETE CASCADE) unless asked, per connection.
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL lets readers proceed while one writer commits.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()


def make_engine(database_url: str) -> Engine:
    """An engine for ``database_url``; for a SQLite file, its folder is created first."""
    url = make_url(database_url)
    dialect = url.get_backend_name()
    if dialect not in SUPPORTED_DIALECTS:
        # Attribute filters are written for these two dialects only.
        raise ValueError(f"unsupported database {dialect!r}; use sqlite or postgresql")
    if dialect == "sqlite":
        if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pool_pre_ping: a connection dropped by a database restart is replaced, not surfaced as 500.
    return create_engine(url, pool_pre_ping=True)


def create_tables(engine: Engine) -> None:
    # Schema migrations come later; until then the tables are created if missing.
    Base.metadata.create_all(engine)


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
