"""Alembic migrations of the metadata schema; ``services.metadata.db.upgrade`` runs them."""
