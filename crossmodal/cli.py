"""``crossmodal``: the project's command-line tool.

``crossmodal run`` starts the whole stack as local processes (what ``make run`` does): it builds
the offline demo model if missing, makes sure Redis is up, starts the five services, indexes the
demo collection once, and keeps running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from crossmodal.stack import LocalStack

DEMO_COLLECTION = "demo"
DEMO_USER = ("demo", "demo-password")


def _redis_reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379), 1.0):
            return True
    except OSError:
        return False


def ensure_redis(url: str, log_dir: Path) -> subprocess.Popen[bytes] | None:
    """Use the Redis at ``url``; start a private, non-persistent one when none answers."""
    if _redis_reachable(url):
        return None
    server = shutil.which("redis-server")
    parsed = urlparse(url)
    if server is None or parsed.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(
            f"Redis does not answer at {url}. Start one (e.g. `redis-server`) or set GATEWAY_REDIS_URL."
        )
    log_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            server,
            "--bind",
            "127.0.0.1",
            "--port",
            str(parsed.port or 6379),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=(log_dir / "redis.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    for _ in range(50):
        if _redis_reachable(url):
            return process
        time.sleep(0.1)
    raise SystemExit(f"redis-server did not start; see {log_dir / 'redis.log'}")


def seed_demo_collection(stack: LocalStack, collection_dir: Path) -> int:
    """Index the demo collection through the gateway, once. Returns the number of items added."""
    from crossmodal.demo.shapes import write_collection

    manifest_path = write_collection(collection_dir)
    manifest: list[dict[str, Any]] = json.loads(manifest_path.read_text())
    with httpx.Client(timeout=60.0) as client:
        existing = client.get(f"{stack.url('metadata')}/collections/{DEMO_COLLECTION}")
        if existing.status_code == 200 and existing.json().get("items", 0) >= len(manifest):
            return 0
        token = client.post(
            f"{stack.url('gateway')}/auth/token",
            data={"grant_type": "password", "username": DEMO_USER[0], "password": DEMO_USER[1]},
        )
        token.raise_for_status()
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        for entry in manifest:
            response = client.post(
                f"{stack.url('gateway')}/items",
                headers=headers,
                data={
                    "collection": DEMO_COLLECTION,
                    "caption": entry["captions"],
                    "attributes": json.dumps(entry["attributes"]),
                },
                files={
                    "image": (
                        entry["file"],
                        (collection_dir / entry["file"]).read_bytes(),
                        "image/png",
                    )
                },
            )
            if response.status_code != 201:
                raise SystemExit(f"indexing {entry['file']} failed: {response.text}")
    return len(manifest)


BANNER = """
Crossmodal Search is running: gateway on {gateway}
  logs:  {logs}/<service>.log        stop: Ctrl-C

  TOKEN=$(curl -s {gateway}/auth/token -d grant_type=password -d username=demo \\
      -d password=demo-password | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s {gateway}/search/text -H "Authorization: Bearer $TOKEN" \\
      -H 'Content-Type: application/json' -d '{{"query": "a red circle", "top_k": 3}}'
"""


def run(args: argparse.Namespace) -> None:
    from crossmodal.demo import ensure_demo_model

    data_dir: Path = args.data_dir.resolve()
    model = args.model or ensure_demo_model(data_dir / "demo" / "model")
    redis_process = ensure_redis(args.redis_url, data_dir / "logs")
    stack = LocalStack(data_dir, model=model, redis_url=args.redis_url)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        print("starting auth, feature, retrieval, metadata, gateway…", flush=True)
        stack.start()
        if not args.no_demo:
            added = seed_demo_collection(stack, data_dir / "demo" / "collection")
            print(
                f"demo collection '{DEMO_COLLECTION}': {added or 'already'} items indexed",
                flush=True,
            )
        print(BANNER.format(gateway=stack.url("gateway"), logs=data_dir / "logs"), flush=True)
        while not stopping:
            for service in stack.services.values():
                if service.process is not None and service.process.poll() is not None:
                    raise SystemExit(f"{service.spec.name} stopped unexpectedly:\n{service.tail()}")
            time.sleep(0.5)
    finally:
        print("stopping…", flush=True)
        stack.stop()
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="crossmodal", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="start the whole stack locally")
    run_parser.add_argument("--data-dir", type=Path, default=Path("var"))
    run_parser.add_argument(
        "--model", help="hub name or local path (default: the offline demo model)"
    )
    run_parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    run_parser.add_argument(
        "--no-demo", action="store_true", help="do not index the demo collection"
    )
    run_parser.set_defaults(handler=run)
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main(sys.argv[1:])
