"""``python -m services.metadata``: run the metadata service in the foreground."""

from services.metadata.app import create_app
from services.metadata.memory import limit_malloc_arenas
from services.metadata.settings import MetadataSettings
from shared.app import serve

if __name__ == "__main__":
    settings = MetadataSettings()
    # Before serve starts any thread (the metrics server, uvicorn, the route thread pool).
    limit_malloc_arenas(settings.malloc_arena_max)
    serve("metadata", create_app, settings)
