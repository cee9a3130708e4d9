"""Alembic environment: the metadata service runs migrations programmatically at start
(``services.metadata.db.upgrade``), handing over an open connection; there is no alembic.ini.

For a new revision, from the repository root:
``.venv/bin/python -m services.metadata.db revision -m "what changes"``.
"""

from __future__ import annotations

from alembic import context

from services.metadata.db import include_name, include_object_for
from services.metadata.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run the metadata migrations through services.metadata.db (upgrade or the module's "
        "command line), which passes an open connection"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    include_name=include_name,
    include_object=include_object_for(connection.dialect.name),
    # SQLite cannot ALTER most things in place: batch mode recreates the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
