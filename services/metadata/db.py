"""Engine creation for SQLite and PostgreSQL, and schema migrations (alembic) at start-up.

``python -m services.metadata.db upgrade`` applies the migrations to ``METADATA_DATABASE_URL``
(the service does the same at every start); ``current`` prints the revision;
``revision -m "message" [--autogenerate]`` writes a new migration file.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url

from services.metadata.models import FULL_TEXT_OBJECTS, POSTGRESQL_ONLY_INDEXES

log = logging.getLogger(__name__)

SUPPORTED_DIALECTS = frozenset({"sqlite", "postgresql"})
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# The revision whose schema equals what the service created before it had migrations.
LEGACY_REVISION = "0001"
# Serialises migrations of replicas starting together against one PostgreSQL database.
_PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"crossmodal-metadata-migrate").digest()[:7], "big")

# SQLite connections kept open: one per worker thread of the route thread pool (anyio's default
# is 40). With the pool's default of 5, every request beyond 5 concurrent ones opened a new
# connection (and ran its pragmas), then closed it: about a fifth of the CPU of a search's metadata
# call at 8 concurrent searches. An idle SQLite connection costs a file handle, no server.
SQLITE_POOL_SIZE = 40


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
        # Filters and full-text search are written for these two dialects only.
        raise ValueError(f"unsupported database {dialect!r}; use sqlite or postgresql")
    if dialect == "sqlite":
        if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, pool_size=SQLITE_POOL_SIZE)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pool_pre_ping: a connection dropped by a database restart is replaced, not surfaced as 500.
    return create_engine(url, pool_pre_ping=True)


def include_name(name: str | None, type_: str, _parents: dict[str, str | None]) -> bool:
    """Schema comparisons skip SQLite's FTS5 tables (and their shadow tables): they are made by
    the migrations alone and have no ORM model."""
    if type_ == "table" and name is not None:
        return not any(name == base or name.startswith(base + "_") for base in FULL_TEXT_OBJECTS)
    return True


def include_object_for(dialect: str) -> Any:
    """Schema comparisons on SQLite skip the PostgreSQL-only (GIN) indexes of the models."""

    def include_object(
        _object: Any, name: str | None, type_: str, _reflected: bool, _compare_to: Any
    ) -> bool:
        return not (
            dialect != "postgresql" and type_ == "index" and name in POSTGRESQL_ONLY_INDEXES
        )

    return include_object


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("version_path_separator", "os")
    config.attributes["connection"] = connection
    return config


@contextmanager
def _file_lock(engine: Engine) -> Iterator[None]:
    # SQLite has no advisory locks; a lock file beside the database serialises processes.
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).with_name(Path(database).name + ".migrate.lock")
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``. A database created before migrations existed (tables
    but no ``alembic_version``) is stamped at ``LEGACY_REVISION`` first, so it is upgraded in
    place rather than failing on "table already exists"."""
    with _file_lock(engine), engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Some SQLite migrations rebuild tables (create, copy, drop, rename). With foreign
            # keys on, dropping the old table would cascade-delete every caption. The pragma only
            # takes effect outside a transaction, hence before anything else.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                if not sqlite:
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY}
                    )
                config = alembic_config(connection)
                tables = set(inspect(connection).get_table_names())
                if "alembic_version" not in tables and "items" in tables:
                    log.info("stamping a database created before migrations at %s", LEGACY_REVISION)
                    command.stamp(config, LEGACY_REVISION)
                command.upgrade(config, revision)
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                connection.commit()
                if broken:
                    raise RuntimeError(f"the migration broke foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                # The connection goes back to the pool: restore what every connection assumes.
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def main(argv: list[str] | None = None) -> None:
    from services.metadata.settings import MetadataSettings

    parser = argparse.ArgumentParser(prog="python -m services.metadata.db")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("upgrade", help="apply every migration")
    commands.add_parser("current", help="print the database's revision")
    revision = commands.add_parser("revision", help="write a new migration file")
    revision.add_argument("-m", "--message", required=True)
    revision.add_argument("--autogenerate", action="store_true")
    args = parser.parse_args(argv)

    engine = make_engine(MetadataSettings().database_url)
    try:
        if args.command == "upgrade":
            upgrade(engine)
        elif args.command == "current":
            print(current_revision(engine))
        else:
            with engine.begin() as connection:
                command.revision(
                    alembic_config(connection),
                    message=args.message,
                    autogenerate=args.autogenerate,
                )
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
