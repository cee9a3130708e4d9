"""``python -m services.auth``: run the auth service in the foreground."""

from __future__ import annotations

from services.auth.app import create_app
from services.auth.settings import AuthSettings
from shared.app import serve


def main() -> None:
    # Settings are validated here first, so a refused production configuration stops the
    # process with pydantic's message before uvicorn starts.
    serve("auth", create_app, AuthSettings())


if __name__ == "__main__":
    main()
