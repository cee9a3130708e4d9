"""``crossmodal``: the project's command-line tool (typer).

- ``crossmodal run`` starts the whole stack as local processes (what ``make run`` does): it
  assembles the offline emoji demo model if missing, makes sure Redis is up, starts the five
  services, indexes the emoji demo collection once, and keeps running until Ctrl-C.
- ``crossmodal login``, ``index``, ``search``, ``collections`` talk to a gateway with a token.
- ``crossmodal reconcile`` compares the metadata and retrieval services and repairs drift.

docs/cli.md describes every command.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlparse

import httpx
import typer
from rich.console import Console, ConsoleDimensions
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from crossmodal.client import (
    DEFAULT_GATEWAY,
    GatewayClient,
    GatewayError,
    TokenSession,
    TokenStore,
)
from crossmodal.stack import LocalStack
from shared.contracts.metadata import caption_key

if TYPE_CHECKING:
    from crossmodal.demo.emoji import Emoji
    from shared.reconcile import DriftReport, RepairReport

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


def seed_demo_collection(
    stack: LocalStack,
    collection_dir: Path,
    emoji: Sequence[Emoji] | None = None,
    *,
    quiet: bool = False,
) -> int:
    """Index the emoji demo (default: all of ``demo_set()``) into the ``demo`` collection
    through the gateway, with the pipeline of ``crossmodal index`` and its duplicate policy:
    emoji drawn alike (a few flags, "person"/"man" pairs) become one item with every name.
    Returns the number of items indexed now: 0 when an earlier start indexed them all. A demo
    collection holding vectors of another model (an older demo, or ``--model`` changed) is
    deleted and indexed again, since its vectors cannot be compared with this model's."""
    from crossmodal.demo.emoji import write_collection
    from crossmodal.ingest import IngestOptions, Ingestor, Journal, load_records

    records = load_records(write_collection(collection_dir, emoji))
    images, captions = _distinct_images_and_captions(records)
    with httpx.Client(timeout=10.0) as http:
        model = http.get(f"{stack.url('feature')}/model", headers=stack.service_headers("feature"))
        model.raise_for_status()
        model_id = model.json()["model_id"]
    gateway = stack.url("gateway")
    with GatewayClient(gateway) as anonymous:
        token = anonymous.password_token(*DEMO_USER).access_token
    with GatewayClient(gateway, token=token) as client:
        try:
            existing: dict[str, Any] | None = client.collection(DEMO_COLLECTION)
        except GatewayError as exc:
            if exc.status != 404:
                raise
            existing = None
        if existing is not None and existing.get("model_id") not in (None, model_id):
            print(
                f"the '{DEMO_COLLECTION}' collection holds vectors of {existing['model_id']}: "
                f"indexing it again with {model_id}",
                flush=True,
            )
            client.delete_collection(DEMO_COLLECTION)
            existing = None
        if (
            existing is not None
            and existing["items"] >= images
            and existing.get("captions", 0) >= captions
        ):
            return 0
        # The collection is the truth (its hash lookup skips what an interrupted start
        # indexed), so the journal only serves this one run.
        journal_path = collection_dir / ".seed.journal.jsonl"
        journal_path.unlink(missing_ok=True)
        options = IngestOptions(collection=DEMO_COLLECTION, concurrency=4, batch_size=64)
        with Journal(journal_path, DEMO_COLLECTION) as journal, ingest_progress(quiet) as bar:
            ingestor = Ingestor(client, options, journal)
            task = bar.add_task(
                f"indexing the emoji demo into '{DEMO_COLLECTION}'", total=len(records)
            )
            ingestor.on_progress = lambda _outcome: bar.advance(task)
            report = ingestor.run(records)
    if report.interrupted:
        raise KeyboardInterrupt
    if report.failures:
        first = report.failures[0]
        raise SystemExit(
            f"indexing the demo: {len(report.failures)} failed, e.g. {first.key}: {first.error}"
        )
    return report.indexed


def _distinct_images_and_captions(records: Sequence[Any]) -> tuple[int, int]:
    """How many items local ``records`` make, and how many captions those hold in all, once
    their duplicates are merged (``caption_key`` tells captions apart, as the server does)."""
    captions: dict[str, set[str]] = {}
    for record in records:
        sha256 = hashlib.sha256(Path(record.source).read_bytes()).hexdigest()
        captions.setdefault(sha256, set()).update(caption_key(c) for c in record.captions)
    return len(captions), sum(len(texts) for texts in captions.values())


BANNER = """
Crossmodal Search is running: gateway on {gateway}
  logs:  {logs}/<service>.log        stop: Ctrl-C

  TOKEN=$(curl -s {gateway}/auth/token -d grant_type=password -d username=demo \\
      -d password=demo-password | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s {gateway}/search/text -H "Authorization: Bearer $TOKEN" \\
      -H 'Content-Type: application/json' -d '{{"query": "pizza", "top_k": 3}}'

  operator tools (crossmodal reconcile) authenticate as this stack's reconcile client:
  export CROSSMODAL_RECONCILE_CLIENT_SECRET={reconcile_secret}
"""


def serve_demo_model(demo_dir: Path) -> Path:
    """The emoji demo model, as its ONNX export when one can be made (the text path costs a
    third), else as the PyTorch checkpoint."""
    from crossmodal.demo import ensure_emoji_model
    from crossmodal.demo.emoji_model import ensure_served_export

    checkpoint = ensure_emoji_model(demo_dir / "emoji-model")
    try:
        return ensure_served_export(checkpoint, demo_dir / "emoji-model-served")
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        err.print(
            f"[yellow]serving the PyTorch checkpoint: the ONNX export failed: {exc}[/yellow]\n"
            + detail.decode(errors="replace")[-2000:]
        )
        return checkpoint


def run_stack(data_dir: Path, model: str | None, redis_url: str, no_demo: bool) -> None:
    data_dir = data_dir.resolve()
    if model is None:
        model = str(serve_demo_model(data_dir / "demo"))
    redis_process = ensure_redis(redis_url, data_dir / "logs")
    stack = LocalStack(data_dir, model=model, redis_url=redis_url)
    interrupted = False

    def interrupt(*_: object) -> None:
        # The first Ctrl-C or SIGTERM stops whatever runs (seeding included); the stack is then
        # stopped without being interrupted again.
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        print("starting auth, feature, retrieval, metadata, gateway…", flush=True)
        stack.start()
        if not no_demo:
            added = seed_demo_collection(stack, data_dir / "demo" / "emoji")
            print(
                f"demo collection '{DEMO_COLLECTION}': {added or 'already'} items indexed",
                flush=True,
            )
        banner = BANNER.format(
            gateway=stack.url("gateway"),
            logs=data_dir / "logs",
            reconcile_secret=stack.client_secrets["reconcile"],
        )
        print(banner, flush=True)
        while True:
            for service in stack.services.values():
                if service.process is not None and service.process.poll() is not None:
                    raise SystemExit(f"{service.spec.name} stopped unexpectedly:\n{service.tail()}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        interrupted = True
        print("stopping…", flush=True)
        stack.stop()
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(10)


def ingest_progress(quiet: bool) -> Progress:
    """The progress bar of ``index`` and of the demo seeding, on stderr."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        ItemsPerSecondColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
    )


class ItemsPerSecondColumn(ProgressColumn):
    """Records settled per second, whatever their outcome, over the last seconds (rich's own
    speed estimate): the pace the ETA is made of."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- records/s" if speed is None else f"{speed:.1f} records/s", style="cyan")


# --- the typer application -------------------------------------------------------------------

app = typer.Typer(
    name="crossmodal",
    help="Crossmodal Search: run the stack locally, index images, search, manage collections.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
collections_app = typer.Typer(
    help="List, inspect, create and delete collections.", no_args_is_help=False
)
app.add_typer(collections_app, name="collections")

# Output that is not read on a terminal (a pipe, a file, a CI log) is not wrapped: a table
# there keeps whole names and values. COLUMNS, when set, still decides.
UNWRAPPED_WIDTH = 10_000


class _Console(Console):
    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or self._width is not None or "COLUMNS" in self._environ:
            return size
        return ConsoleDimensions(UNWRAPPED_WIDTH, size.height)


err = _Console(stderr=True)
out = _Console()

GatewayOption = Annotated[
    str,
    typer.Option("--gateway", envvar="CROSSMODAL_GATEWAY", help="Gateway URL.", show_default=True),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="CROSSMODAL_TOKEN",
        help="Access token (default: the one `crossmodal login` saved for this gateway).",
        show_default=False,
    ),
]
CollectionOption = Annotated[str, typer.Option("--collection", "-c", help="Collection name.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _client(gateway: str, token: str | None) -> GatewayClient:
    if token:  # given: used as it is
        return GatewayClient(gateway, token=token)
    store = TokenStore()
    saved = store.load(gateway)
    if saved is None:
        raise fail(f"no token for {gateway}: run `crossmodal login` or pass --token")
    if saved.expired and saved.refresh_token is None:
        raise fail(f"the saved token for {gateway} has expired: run `crossmodal login`")
    # The saved login: its access token renewed with its refresh token as long as that lives.
    return GatewayClient(gateway, session=TokenSession(gateway, saved, store))


def _problem(exc: GatewayError) -> typer.Exit:
    return fail(str(exc))


@app.command()
def run(
    data_dir: Annotated[Path, typer.Option(help="Where local state lives.")] = Path("var"),
    model: Annotated[
        str | None,
        typer.Option(help="Hub name or local path (default: the offline emoji demo model)."),
    ] = None,
    redis_url: Annotated[str, typer.Option()] = "redis://127.0.0.1:6379/0",
    no_demo: Annotated[
        bool, typer.Option("--no-demo", help="Do not index the demo collection.")
    ] = False,
) -> None:
    """Start the whole stack locally (what `make run` does)."""
    run_stack(data_dir, model, redis_url, no_demo)


@app.command()
def login(
    gateway: GatewayOption = DEFAULT_GATEWAY,
    username: Annotated[str | None, typer.Option(help="User name (password grant).")] = None,
    password: Annotated[
        str | None,
        typer.Option(envvar="CROSSMODAL_PASSWORD", help="Asked for when not given."),
    ] = None,
    client_id: Annotated[str | None, typer.Option(help="Client id (client credentials).")] = None,
    client_secret: Annotated[
        str | None, typer.Option(envvar="CROSSMODAL_CLIENT_SECRET", help="Client secret.")
    ] = None,
    scope: Annotated[str | None, typer.Option(help="Space-separated scopes to ask for.")] = None,
) -> None:
    """Get a token from the gateway and save it for later commands (file mode 0600)."""
    with GatewayClient(gateway) as client:
        try:
            if client_id:
                secret = client_secret or typer.prompt("Client secret", hide_input=True)
                token = client.client_token(client_id, secret, scope)
            else:
                user = username or typer.prompt("User name")
                secret = password or typer.prompt("Password", hide_input=True)
                token = client.password_token(user, secret, scope)
        except GatewayError as exc:
            raise _problem(exc) from None
    store = TokenStore()
    store.save(gateway, token)
    until = (
        datetime.fromtimestamp(token.expires_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if token.expires_at
        else "no expiry given"
    )
    out.print(f"logged in to {gateway}; token saved in {store.path} (valid until {until})")


@app.command()
def logout(gateway: GatewayOption = DEFAULT_GATEWAY) -> None:
    """Forget the token saved for this gateway."""
    forgotten = TokenStore().forget(gateway)
    out.print("token removed" if forgotten else f"no token saved for {gateway}")


@app.command()
def index(
    source: Annotated[
        Path, typer.Argument(help="A folder, a COCO captions file, or a .jsonl/.csv manifest.")
    ],
    collection: CollectionOption,
    gateway: GatewayOption = DEFAULT_GATEWAY,
    token: TokenOption = None,
    fmt: Annotated[
        str, typer.Option("--format", help="auto, folder, coco, jsonl or csv.")
    ] = "auto",
    images_root: Annotated[
        Path | None, typer.Option(help="Where COCO image files are (default: guessed).")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Uploads in flight.")] = 4,
    batch_size: Annotated[
        int, typer.Option(min=1, max=1024, help="Records read, checked and journaled together.")
    ] = 32,
    retries: Annotated[int, typer.Option(min=0, max=20, help="Retries of a passing failure.")] = 3,
    journal: Annotated[
        Path | None, typer.Option(help="Journal file (default: under ~/.cache/crossmodal).")
    ] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Ignore the journal of earlier runs.")
    ] = False,
    tag: Annotated[list[str] | None, typer.Option(help="A tag for every item; repeatable.")] = None,
    allow_outside: Annotated[
        bool,
        typer.Option(
            "--allow-outside",
            help="Index local files outside the manifest's folder (or the images root, or the "
            "folder indexed), reached by '..', an absolute path or a symbolic link.",
        ),
    ] = False,
    allow_private_urls: Annotated[
        bool,
        typer.Option(
            "--allow-private-urls",
            help="Let URLs reach loopback, private and link-local addresses (SSRF guard off).",
        ),
    ] = False,
    allow_network: Annotated[
        list[str] | None,
        typer.Option(help="A network URLs may reach despite the guard, e.g. 10.2.0.0/16."),
    ] = None,
    max_image_mb: Annotated[float, typer.Option(min=0.001, help="Largest image to read.")] = 20.0,
    url_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds per URL connect/read.")
    ] = 10.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Index a folder, a COCO file or a manifest into a collection, resumably."""
    from crossmodal.ingest import (
        FetchPolicy,
        IngestOptions,
        Ingestor,
        Journal,
        JournalError,
        SourceError,
        default_journal_path,
        load_records,
    )
    from crossmodal.ingest.sources import with_tags

    if fmt not in ("auto", "folder", "coco", "jsonl", "csv"):
        raise fail(f"unknown format {fmt!r}: use auto, folder, coco, jsonl or csv")
    try:
        records = with_tags(
            load_records(  # type: ignore[arg-type]
                source, fmt, images_root=images_root, allow_outside=allow_outside
            ),
            tag or [],
        )
        networks = FetchPolicy.networks(allow_network or [])
    except (SourceError, ValueError) as exc:
        raise fail(str(exc)) from None
    max_bytes = int(max_image_mb * 1024 * 1024)
    options = IngestOptions(
        collection=collection,
        concurrency=concurrency,
        batch_size=batch_size,
        retries=retries,
        max_image_bytes=max_bytes,
        fetch_policy=FetchPolicy(
            allow_private=allow_private_urls,
            allowed_networks=networks,
            max_bytes=max_bytes,
            timeout=url_timeout,
        ),
    )
    journal_path = journal or default_journal_path(source, collection)
    if restart:
        journal_path.unlink(missing_ok=True)
    try:
        log = Journal(journal_path, collection)
    except JournalError as exc:
        raise fail(str(exc)) from None
    try:
        client = _client(gateway, token)
    except typer.Exit:
        log.close()
        raise
    progress = ingest_progress(quiet)
    with client, log, progress:
        ingestor = Ingestor(client, options, log)
        todo = ingestor.pending(records)
        task = progress.add_task(f"indexing into {collection}", total=len(todo))
        ingestor.on_progress = lambda _outcome: progress.advance(task)
        report = ingestor.run(records)
    _print_report(report, journal_path)
    if report.stopped is not None:
        raise fail(f"stopped: the gateway refused the token: {report.stopped}")
    if report.interrupted:
        raise typer.Exit(130)
    if report.failures:
        raise typer.Exit(1)


def _print_report(report: Any, journal_path: Path) -> None:
    out.print(
        f"{report.indexed} indexed, {report.merged} merged, {report.duplicates} already there, "
        f"{len(report.failures)} failed, {report.resumed} done by an earlier run "
        f"({report.total} in the input) in {report.seconds:.1f}s "
        f"= {report.items_per_second:.1f} indexed/s",
        highlight=False,
    )
    if report.conflicts:
        table = Table(title="attributes kept: the item had other values", show_lines=False)
        table.add_column("source", overflow="fold")
        table.add_column("item", justify="right")
        table.add_column("kept", overflow="fold")
        for conflict in report.conflicts[:50]:
            table.add_row(conflict.key, str(conflict.item_id), conflict.note or "")
        out.print(table)
        if len(report.conflicts) > 50:
            out.print(f"… and {len(report.conflicts) - 50} more (see {journal_path})")
    if report.failures:
        table = Table(title="failures", show_lines=False)
        table.add_column("source", overflow="fold")
        table.add_column("reason", overflow="fold")
        for failure in report.failures[:50]:
            table.add_row(failure.key, failure.error or "")
        out.print(table)
        if len(report.failures) > 50:
            out.print(f"… and {len(report.failures) - 50} more (see {journal_path})")
        if report.stopped is None:
            out.print("Run the same command again to retry the failures.")
    if report.interrupted:
        out.print(f"Interrupted: run the same command again to resume ({journal_path}).")


@app.command()
def search(
    collection: CollectionOption,
    query: Annotated[str | None, typer.Argument(help="Text to search for.")] = None,
    image: Annotated[Path | None, typer.Option(help="Search by this image instead.")] = None,
    gateway: GatewayOption = DEFAULT_GATEWAY,
    token: TokenOption = None,
    top_k: Annotated[int, typer.Option(min=1, max=100)] = 10,
    target: Annotated[
        str | None,
        typer.Option(
            help="image (images) or text (captions); by default what the API answers: images "
            "for a text query, captions for --image."
        ),
    ] = None,
    filters: Annotated[str | None, typer.Option(help="A JSON filter (docs/metadata.md).")] = None,
    mode: Annotated[
        str, typer.Option(help="vector, keyword or hybrid (text queries; needs gateway support).")
    ] = "vector",
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw answer.")] = False,
) -> None:
    """Search a collection by text or by image."""
    if (query is None) == (image is None):
        raise fail("give either a text query or --image")
    if target not in (None, "image", "text"):
        raise fail("--target is image or text")
    try:
        parsed_filters = json.loads(filters) if filters else None
    except ValueError:
        raise fail("--filters is not valid JSON") from None
    with _client(gateway, token) as client:
        try:
            if image is not None:
                try:
                    data = image.read_bytes()
                except OSError as exc:
                    raise fail(f"{image}: {exc.strerror}") from None
                answer = client.search_image(
                    data,
                    collection=collection,
                    filename=image.name,
                    top_k=top_k,
                    target=target,
                    filters=parsed_filters,
                )
            else:
                answer = client.search_text(
                    query or "",
                    collection=collection,
                    top_k=top_k,
                    target=target,
                    filters=parsed_filters,
                    mode=mode,
                )
        except GatewayError as exc:
            raise _problem(exc) from None
    if as_json:
        out.print_json(data=answer)
        return
    table = Table(title=f"{collection}: {len(answer['results'])} results")
    for column in ("rank", "score", "item", "caption", "attributes"):
        table.add_column(column, overflow="fold")
    for hit in answer["results"]:
        item = hit["item"]
        caption = (hit.get("caption") or {}).get("text") or next(
            (c["text"] for c in item.get("captions", [])), ""
        )
        table.add_row(
            str(hit["rank"]),
            f"{hit['score']:.4f}",
            str(hit["item_id"]),
            caption,
            json.dumps(item.get("attributes", {}), ensure_ascii=False),
        )
    out.print(table)


def _collection_table(collections: list[dict[str, Any]]) -> Table:
    table = Table()
    for column in ("name", "indexed", "pending", "failed", "captions", "model", "index"):
        table.add_column(column, overflow="fold")
    for entry in collections:
        counts = entry.get("counts") or {}
        table.add_row(
            entry["name"],
            str(entry.get("items", counts.get("indexed", ""))),
            str(counts.get("pending", "")),
            str(counts.get("failed", "")),
            str(entry.get("captions", "")),
            str(entry.get("model_id") or ""),
            str((entry.get("index") or {}).get("factory", "")),
        )
    return table


@collections_app.callback(invoke_without_command=True)
def collections_default(
    ctx: typer.Context,
    gateway: GatewayOption = DEFAULT_GATEWAY,
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Without a subcommand: list the collections."""
    if ctx.invoked_subcommand is None:
        list_collections(gateway, token, as_json)


@collections_app.command("list")
def list_collections(
    gateway: GatewayOption = DEFAULT_GATEWAY,
    token: TokenOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the collections with their item counts."""
    with _client(gateway, token) as client:
        try:
            collections = client.collections()
        except GatewayError as exc:
            raise _problem(exc) from None
    if as_json:
        out.print_json(data={"collections": collections})
    else:
        out.print(_collection_table(collections))


@collections_app.command("show")
def show_collection(
    name: Annotated[str, typer.Argument()],
    gateway: GatewayOption = DEFAULT_GATEWAY,
    token: TokenOption = None,
) -> None:
    """Describe one collection: counts by status, model, index settings."""
    with _client(gateway, token) as client:
        try:
            described = client.collection(name)
        except GatewayError as exc:
            raise _problem(exc) from None
    out.print_json(data=described)


@collections_app.command("create")
def create_collection(
    name: Annotated[str, typer.Argument()],
    gateway: GatewayOption = DEFAULT_GATEWAY,
    token: TokenOption = None,
    model_id: Annotated[
        str | None, typer.Option(help="The model its vectors must come from.")
    ] = None,
    index_factory: Annotated[
        str | None, typer.Option(help="Faiss index factory, e.g. Flat or HNSW32.")
    ] = None,
    description: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Create a collection with its model and index settings."""
    with _client(gateway, token) as client:
        try:
            created = client.create_collection(
                name, model_id=model_id, index_factory=index_factory, description=description
            )
        except GatewayError as exc:
            raise _problem(exc) from None
    out.print_json(data=created)


@collections_app.command("delete")
def delete_collection(
    name: Annotated[str, typer.Argument()],
    gateway: GatewayOption = DEFAULT_GATEWAY,
    token: TokenOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    wait: Annotated[
        bool,
        typer.Option(
            help="Wait until everything is removed and the name is free (--no-wait: return "
            "once the collection is gone from answers)."
        ),
    ] = True,
) -> None:
    """Delete a collection, its items and their vectors."""
    if not yes:
        typer.confirm(f"Delete collection {name!r} and everything in it?", abort=True)
    with _client(gateway, token) as client:
        try:
            deletion = client.delete_collection(name, wait=wait)
        except GatewayError as exc:
            raise _problem(exc) from None
    out.print_json(data=deletion)


@app.command()
def reconcile(
    collection: Annotated[str, typer.Argument(help="The collection to check.")],
    metadata_url: Annotated[
        str, typer.Option(envvar="CROSSMODAL_METADATA_URL")
    ] = "http://127.0.0.1:8004",
    retrieval_url: Annotated[
        str, typer.Option(envvar="CROSSMODAL_RETRIEVAL_URL")
    ] = "http://127.0.0.1:8003",
    feature_url: Annotated[
        str | None,
        typer.Option(
            envvar="CROSSMODAL_FEATURE_URL",
            help="Re-embed with this feature service; without it, drifted items are marked failed.",
        ),
    ] = None,
    auth_url: Annotated[
        str,
        typer.Option(
            envvar="CROSSMODAL_AUTH_URL",
            help="Where the service tokens come from (the secret: "
            "CROSSMODAL_RECONCILE_CLIENT_SECRET).",
        ),
    ] = "http://127.0.0.1:8001",
    repair: Annotated[bool, typer.Option("--repair", help="Fix what the check finds.")] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="With --repair: index failed items again.")
    ] = False,
    stale_after: Annotated[
        float, typer.Option(min=0, help="Seconds after which a pending item counts as stuck.")
    ] = 600.0,
    redis_url: Annotated[
        str | None,
        typer.Option(help="After repairs, invalidate the gateway's cached pages in this Redis."),
    ] = None,
    cache_prefix: Annotated[str, typer.Option(help="The gateway's GATEWAY_CACHE_PREFIX.")] = (
        "crossmodal"
    ),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Find drift between metadata and retrieval (an operator tool: internal service URLs)."""
    from crossmodal.reconcile import connect
    from services.gateway.cache import invalidate
    from shared.reconcile import ReconcileError

    async def run() -> tuple[DriftReport, RepairReport | None]:
        async with connect(
            metadata_url=metadata_url,
            retrieval_url=retrieval_url,
            feature_url=feature_url,
            auth_url=auth_url,
        ) as reconciler:
            found = await reconciler.check(collection, stale_after=timedelta(seconds=stale_after))
            fixed = await reconciler.repair(found, retry_failed=retry_failed) if repair else None
            return found, fixed

    try:
        report, repaired = asyncio.run(run())
    except ReconcileError as exc:
        raise fail(str(exc)) from None
    summary = report.summary()
    if repaired is not None:
        summary["repair"] = {
            "reindexed": repaired.reindexed,
            "marked_failed": repaired.marked_failed,
            "vectors_deleted": repaired.vectors_deleted,
            "errors": repaired.errors,
        }
        if redis_url and (repaired.reindexed or repaired.marked_failed or repaired.vectors_deleted):
            invalidate(redis_url, cache_prefix, collection)
    if as_json:
        out.print_json(data=summary)
    else:
        _print_drift(summary)
    if repaired is not None:
        if repaired.errors:
            raise typer.Exit(1)
    elif not report.clean:
        raise typer.Exit(1)


def _print_drift(summary: dict[str, Any]) -> None:
    meta, retr = summary["metadata"], summary["retrieval"]
    out.print(
        f"{summary['collection']}: metadata {meta['indexed']} indexed, {meta['pending']} pending,"
        f" {meta['failed']} failed; retrieval {retr.get('image', 0)} image and "
        f"{retr.get('text', 0)} text vectors (checked by {summary['method']})",
        highlight=False,
    )
    for key, label in (
        ("missing", "indexed items with vectors missing"),
        ("stuck", "items stuck pending"),
        ("stale", "failed/stuck items that still have vectors"),
        ("failed", "failed items"),
    ):
        ids = summary[key]
        if ids:
            shown = ", ".join(map(str, ids[:20])) + (" …" if len(ids) > 20 else "")
            out.print(f"  {len(ids)} {label}: {shown}", highlight=False)
    orphans = summary["orphans"]
    if any(orphans.values()):
        out.print(
            f"  vectors without a metadata item: {orphans['image']} image, {orphans['text']} text",
            highlight=False,
        )
    if "repair" in summary:
        repair = summary["repair"]
        out.print(
            f"repaired: {len(repair['reindexed'])} re-indexed, {len(repair['marked_failed'])} "
            f"marked failed, {repair['vectors_deleted']} vectors deleted",
            highlight=False,
        )
        for error in repair["errors"]:
            out.print(f"  [red]{error}[/red]")
    elif summary["clean"]:
        out.print("no drift")


# The model commands keep their own argparse parsers (also run as ``python -m crossmodal.train``);
# typer hands them every argument, --help included.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def evaluate(ctx: typer.Context) -> None:
    """Recall@1/5/10 both ways of a model on a COCO-format dataset (see --help)."""
    from crossmodal.evaluate.__main__ import main as evaluate_main

    raise typer.Exit(evaluate_main(ctx.args, prog="crossmodal evaluate"))


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Fine-tune a CLIP-family model contrastively on image-caption pairs (see --help)."""
    from crossmodal.train.__main__ import main as train_main

    raise typer.Exit(train_main(ctx.args, prog="crossmodal train"))


def main(argv: list[str] | None = None) -> None:
    """The ``crossmodal`` script (pyproject) and ``python -m crossmodal``."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="crossmodal")


if __name__ == "__main__":
    main(sys.argv[1:])
