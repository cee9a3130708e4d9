"""Problem errors of the retrieval service (stable ``code`` values, see docs/architecture.md)."""

from __future__ import annotations

from shared.problems import Conflict, NotFound, ServiceUnavailable, Unprocessable


class CollectionNotFound(NotFound):
    code = "collection_not_found"


class ModelMismatch(Conflict):
    code = "model_mismatch"


class DimensionMismatch(Unprocessable):
    code = "dimension_mismatch"


class CollectionUnavailable(ServiceUnavailable):
    code = "collection_unavailable"


class InvalidIndexSettings(Unprocessable):
    """An index setting that cannot work: an unknown factory string, a value out of range."""

    code = "invalid_index"


class IndexSettingsConflict(Conflict):
    """A change to a collection's settings that needs a migration (its vector storage)."""

    code = "index_settings_conflict"
