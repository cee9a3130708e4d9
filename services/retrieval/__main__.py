"""``python -m services.retrieval``: run the retrieval service in the foreground."""

from services.retrieval.app import create_app
from services.retrieval.settings import RetrievalSettings
from shared.app import serve


def main() -> None:
    serve("retrieval", create_app, RetrievalSettings())


if __name__ == "__main__":
    main()
