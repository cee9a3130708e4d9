"""``python -m services.gateway``: run the gateway in the foreground."""

from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from shared.app import serve


def main() -> None:
    settings = GatewaySettings()
    # The one service with proxies in front: X-Forwarded-For is taken from those only.
    serve(
        "gateway",
        create_app,
        settings,
        trusted_proxies=settings.trusted_proxies,
        workers=settings.workers,
    )


if __name__ == "__main__":
    main()
