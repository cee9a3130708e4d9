"""``crossmodal reconcile`` and ``python -m crossmodal.reconcile``: the drift check and repair
of ``shared.reconcile`` on demand, from an operator's machine. It talks to the internal services
directly (metadata, retrieval, and the feature service to re-embed), not to the gateway, as the
``reconcile`` client with service tokens from the auth service
(``CROSSMODAL_RECONCILE_CLIENT_SECRET``; docs/security.md). The gateway runs the same repair by
itself (``services/gateway/maintenance.py``); this is for a look now, or a stack without it.
``--interval`` and ``--metrics-port`` make it a long-running reconciler.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import timedelta

import httpx
from prometheus_client import start_http_server

from shared.contracts.feature import FeatureClient
from shared.contracts.metadata import MetadataClient
from shared.contracts.retrieval import RetrievalClient
from shared.http import ServiceClient
from shared.reconcile import ReconcileError, Reconciler
from shared.service_auth import DEVELOPMENT_CLIENT_SECRETS
from shared.service_tokens import ServiceTokens

log = logging.getLogger(__name__)

DEFAULT_AUTH_URL = "http://127.0.0.1:8001"
SECRET_ENV = "CROSSMODAL_RECONCILE_CLIENT_SECRET"


@asynccontextmanager
async def connect(
    *,
    metadata_url: str,
    retrieval_url: str,
    feature_url: str | None = None,
    auth_url: str = DEFAULT_AUTH_URL,
) -> AsyncIterator[Reconciler]:
    """A reconciler with its own clients, closed on exit. It calls the services as the
    ``reconcile`` client (shared/service_auth.py), with service tokens from ``auth_url`` and the
    secret in ``CROSSMODAL_RECONCILE_CLIENT_SECRET``."""
    auth = service_client("auth", auth_url)
    tokens = ServiceTokens(auth, "reconcile", client_secret())
    metadata = MetadataClient(
        service_client("metadata", metadata_url, tokens.credentials("metadata"))
    )
    retrieval = RetrievalClient(
        service_client("retrieval", retrieval_url, tokens.credentials("retrieval"))
    )
    feature = (
        FeatureClient(service_client("feature", feature_url, tokens.credentials("feature")))
        if feature_url
        else None
    )
    try:
        yield Reconciler(metadata, retrieval, feature)
    finally:
        await tokens.aclose()
        for client in (metadata, retrieval, feature):
            if client is not None:
                await client.aclose()
        await auth.aclose()


def service_client(
    name: str, base_url: str, credentials: httpx.Auth | None = None
) -> ServiceClient:
    """An operator tool's client: generous timeouts (a whole collection's ids in one answer),
    the usual retries, no circuit breaker."""
    return ServiceClient(name, base_url, timeout=60.0, connect_timeout=5.0, credentials=credentials)


def client_secret() -> str:
    """The ``reconcile`` client's secret: ``CROSSMODAL_RECONCILE_CLIENT_SECRET`` (never an
    option: a command line is visible to every user of the machine), else the development
    default, which a production auth service refuses."""
    return os.environ.get(SECRET_ENV) or DEVELOPMENT_CLIENT_SECRETS["reconcile"]


# -- command line --------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m crossmodal.reconcile``."""
    env = os.environ.get
    parser.add_argument("--collection", action="append", help="repeatable; default: all")
    parser.add_argument("--repair", action="store_true", help="fix what the check finds")
    parser.add_argument("--retry-failed", action="store_true", help="with --repair")
    parser.add_argument(
        "--retrieval-url", default=env("CROSSMODAL_RETRIEVAL_URL", "http://127.0.0.1:8003")
    )
    parser.add_argument(
        "--metadata-url", default=env("CROSSMODAL_METADATA_URL", "http://127.0.0.1:8004")
    )
    parser.add_argument("--auth-url", default=env("CROSSMODAL_AUTH_URL", DEFAULT_AUTH_URL))
    parser.add_argument(
        "--feature-url",
        default=env("CROSSMODAL_FEATURE_URL"),
        help="re-embed with this feature service; without it, drifted items are marked failed",
    )
    parser.add_argument("--stale-after", type=float, default=600.0, help="seconds")
    parser.add_argument("--redis-url", help="after repairs, invalidate the gateway's cache")
    parser.add_argument("--cache-prefix", default="crossmodal")
    parser.add_argument("--interval", type=float, help="run every INTERVAL seconds")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics on this port")


def run(args: argparse.Namespace) -> int:
    """0: clean (or repaired without errors); 1: drift left or repair errors; 2: a service
    failed. With ``--interval``, runs until interrupted."""
    if args.metrics_port:
        start_http_server(args.metrics_port)
    while True:
        status = _run_once(args)
        if args.interval is None:
            return status
        time.sleep(args.interval)


def _run_once(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_reconcile_all(args))
    except ReconcileError as exc:
        print(f"reconcile failed: {exc}", file=sys.stderr)
        return 2


async def _reconcile_all(args: argparse.Namespace) -> int:
    """Prints each collection's summary as soon as it is done."""
    status = 0
    async with connect(
        metadata_url=args.metadata_url,
        retrieval_url=args.retrieval_url,
        feature_url=args.feature_url,
        auth_url=args.auth_url,
    ) as reconciler:
        names = args.collection or await reconciler.collections()
        for name in names:
            report = await reconciler.check(name, stale_after=timedelta(seconds=args.stale_after))
            summary = report.summary()
            if args.repair:
                repaired = await reconciler.repair(report, retry_failed=args.retry_failed)
                summary["repair"] = asdict(repaired)
                changed = repaired.reindexed or repaired.marked_failed
                if args.redis_url and (changed or repaired.vectors_deleted):
                    # The gateway's cache keys are the gateway's: its module bumps them.
                    from services.gateway.cache import invalidate

                    invalidate(args.redis_url, args.cache_prefix, name)
                if repaired.errors:
                    status = 1
            elif not report.clean:
                status = 1
            print(json.dumps(summary), flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crossmodal.reconcile",
        description="Find and repair drift between the metadata and retrieval services; "
        "prints one JSON summary per collection.",
    )
    configure_parser(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
