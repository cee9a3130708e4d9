"""``python -m services.metadata``: run the metadata service in the foreground."""

from services.metadata.app import create_app
from services.metadata.settings import MetadataSettings
from shared.app import serve

if __name__ == "__main__":
    serve("metadata", create_app, MetadataSettings())
