"""End-to-end search benchmark: the five services through the gateway against one process.

    python -m benchmarks.e2e                 # the full run (make bench-e2e): 1M vectors, both models
    python -m benchmarks.e2e --quick         # a smoke run: 2,000 vectors, demo model, 1 and 8 clients

For each model (the emoji demo model `make run` serves, and ViT-B/32 with random weights) it

1. builds a collection of ``--vectors`` CLIP-like vectors of the model's dimension with the bulk
   builder (``services.retrieval.build``, in process) and writes one indexed item with one caption
   per vector straight into the metadata SQLite database (the schema from the migrations, rows
   with SQLAlchemy Core): nothing goes through the API. Built once under var/bench/e2e/<model>-<n>/
   and reused by later runs;
2. starts the stack with ``crossmodal.stack.LocalStack`` on free ports over that directory, rate
   limits set out of reach (stated in the output), a cache prefix of its own, and gets one token
   per phase (password grant, the development user);
3. drives POST /search/text and POST /search/image (both target=image: the bulk builder writes one
   modality, image) from a load generator in its own process (benchmarks/loadgen.py: closed loop,
   raw keep-alive connections), at each client count, with the cache missing (a distinct query
   every request) and hitting (one query, answered from Redis: X-Cache: hit), and reads the CPU
   time of every service (and of redis-server) from /proc/<pid>/stat before and after each phase;
4. stops the stack and serves the same model, index and items from one process
   (benchmarks/baseline_app.py, the tutorial's shape) and drives it with the same load generator.

It prints a markdown table (and writes it with --markdown) and writes every figure as JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.metrics import process_group_usage

ROOT = Path(__file__).resolve().parents[1]
E2E_DIR = ROOT / "var" / "bench" / "e2e"
COLLECTION = "bench"
DATA_VERSION = 1  # bump when the layout of the built data changes
PROCESSES = ("gateway", "auth", "feature", "retrieval", "metadata", "redis", "baseline", "loadgen")
GOAL_RATIO = 0.8  # the services keep at least 80 % of the single process's throughput
HEADLINE_CLIENTS = (8, 32)
# Out of reach of any phase, but the limiter still runs (its Redis calls are part of the cost).
UNLIMITED = {"rate": 1_000_000, "burst": 1_000_000}
MODELS = {"demo": "emoji demo (ConvNeXt + MiniLM)", "vit-b32": "ViT-B/32 (random weights)"}


# --- pure helpers (tested in tests/benchmarks/test_e2e_bench.py) ------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-q * len(ordered) // 100)))
    return ordered[int(rank) - 1]


def cpu_ms_per_request(
    before: dict[str, float], after: dict[str, float], requests: int
) -> dict[str, float]:
    """CPU milliseconds per answered request of each process seen at both ends."""
    if requests <= 0:
        return {}
    return {
        name: (after[name] - before[name]) * 1000 / requests for name in before if name in after
    }


@dataclass
class Row:
    """One phase: a system (``services`` or ``baseline``) under one load."""

    scenario: str
    system: str
    kind: str
    cache: str
    clients: int
    requests: int = 0
    seconds: float = 0.0
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    p99_ms: float = float("nan")
    statuses: dict[str, int] = field(default_factory=dict)
    x_cache: dict[str, int] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors(self) -> dict[str, int]:
        return {k: v for k, v in self.statuses.items() if k != "200"}


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def render_table(rows: Sequence[Row]) -> str:
    """The results as a markdown table, one line per phase."""
    head = (
        "| scenario | system | kind | cache | clients | req/s | p50 ms | p95 ms | p99 ms | "
        "errors | X-Cache | CPU ms/req: gateway | auth | feature | retrieval | metadata | "
        "redis | baseline | load gen |"
    )
    lines = [head, "|" + "---|" * 5 + "---:|" * 4 + "---|---|" + "---:|" * 8]
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "0"
        caches = ", ".join(f"{k} {v}" for k, v in sorted(r.x_cache.items())) or "-"
        cpu = [_fmt(r.cpu_ms.get(name), 2) for name in PROCESSES]
        lines.append(
            f"| {r.scenario} | {r.system} | {r.kind} | {r.cache} | {r.clients} | {_fmt(r.rps)} | "
            f"{_fmt(r.p50_ms)} | {_fmt(r.p95_ms)} | {_fmt(r.p99_ms)} | {errors} | {caches} | "
            + " | ".join(cpu)
            + " |"
        )
    return "\n".join(lines)


def headline(
    rows: Sequence[Row], clients: Sequence[int] = HEADLINE_CLIENTS
) -> list[dict[str, Any]]:
    """Services (cache missing) over the single process, in throughput and p99, per scenario,
    kind and client count present on both sides."""
    out = []
    for r in rows:
        if r.system != "services" or r.cache != "miss" or r.clients not in clients:
            continue
        base = next(
            (
                b
                for b in rows
                if b.system == "baseline"
                and (b.scenario, b.kind, b.clients) == (r.scenario, r.kind, r.clients)
            ),
            None,
        )
        if base is None or not base.rps:
            continue
        ratio = r.rps / base.rps
        out.append(
            {
                "scenario": r.scenario,
                "kind": r.kind,
                "clients": r.clients,
                "throughput_ratio": ratio,
                "p99_ratio": r.p99_ms / base.p99_ms if base.p99_ms else float("nan"),
                "goal_met": ratio >= GOAL_RATIO,
            }
        )
    return out


def render_headline(items: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| scenario | kind | clients | throughput services / one process | "
        "p99 services / one process | goal (>= 0.80) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for h in items:
        lines.append(
            f"| {h['scenario']} | {h['kind']} | {h['clients']} | {h['throughput_ratio']:.2f} | "
            f"{h['p99_ratio']:.2f} | {'met' if h['goal_met'] else 'not met'} |"
        )
    return "\n".join(lines)


# --- processes and their CPU time -----------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and every process under it (a gateway's workers)."""
    return process_group_usage(pid).cpu_seconds


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, ValueError):
            out[name] = cpu_seconds(pid)
    return out


def redis_pid(url: str) -> int | None:
    """redis-server's pid from INFO (None when Redis does not say or /proc cannot be read)."""
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2)
        pid = int(client.info("server")["process_id"])
        client.close()
        cpu_seconds(pid)
        return pid
    except Exception:
        return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- data: the collection, built in bulk ----------------------------------------------------


def model_info(name: str) -> tuple[Path, str, int]:
    """(model folder, the model id the feature service will report, dimension) of a model of
    ``MODELS`` or of a model folder."""
    from benchmarks.feature import model_dir
    from services.feature.model import default_model_id

    path = Path(name) if Path(name).is_dir() else model_dir("emoji" if name == "demo" else name)
    config = json.loads((path / "config.json").read_text())
    dim = config.get("projection_dim") or config.get("text_config", {}).get("projection_dim")
    if not dim:
        raise SystemExit(f"{path}: no projection_dim in config.json")
    return path, default_model_id(str(path)), int(dim)


def prepare_data(data_dir: Path, *, model_id: str, dim: int, n: int, index: str) -> None:
    """The retrieval collection (bulk builder) and its items (SQLite rows), unless a finished
    earlier build of the same plan is there."""
    marker = data_dir / "bench_data.json"
    plan = {"version": DATA_VERSION, "model_id": model_id, "dim": dim, "n": n, "index": index}
    if marker.is_file() and json.loads(marker.read_text()) == plan:
        return
    for sub in ("retrieval", "metadata", "auth", "logs"):
        shutil.rmtree(data_dir / sub, ignore_errors=True)
    marker.unlink(missing_ok=True)
    started = time.monotonic()
    build_vectors(data_dir / "retrieval", model_id=model_id, dim=dim, n=n, index=index)
    print(f"  vectors built in {time.monotonic() - started:.0f}s", file=sys.stderr)
    started = time.monotonic()
    insert_items(data_dir / "metadata" / "metadata.db", model_id=model_id, n=n)
    print(f"  {n:,} items written in {time.monotonic() - started:.0f}s", file=sys.stderr)
    marker.write_text(json.dumps(plan))


def build_vectors(retrieval_dir: Path, *, model_id: str, dim: int, n: int, index: str) -> None:
    """``n`` CLIP-like vectors under ids 1..n (metadata ids start at 1) in the image modality,
    with the bulk builder's own code and the service's memory budget (so ``auto`` picks what
    the service would)."""
    import numpy as np

    from services.retrieval.build import Progress, Source, build
    from services.retrieval.indexing import IndexSpec
    from services.retrieval.settings import RetrievalSettings
    from services.retrieval.synthetic import ClipLike

    generator = ClipLike(dim, seed=0)
    source = Source(
        n,
        dim,
        lambda a, b: generator.rows(a, b, stream=1),
        lambda: np.arange(1, n + 1, dtype=np.int64),
        {"synthetic": n, "seed": 0, "ids": "1..n"},
    )
    build(
        retrieval_dir,
        COLLECTION,
        model_id=model_id,
        modality="image",
        source=source,
        spec=IndexSpec.from_dict({"factory": index}),
        memory_budget=int(RetrievalSettings().memory_budget),
        progress=Progress(),
    )


def insert_items(db_path: Path, *, model_id: str, n: int, chunk: int = 20_000) -> None:
    """Items 1..n, indexed, each with one caption, and their collection: the migrations make
    the schema (FTS triggers included), SQLAlchemy Core writes the rows in chunks."""
    from sqlalchemy import insert

    from services.metadata.db import make_engine, upgrade
    from services.metadata.models import Caption, Collection, Item

    engine = make_engine(f"sqlite:///{db_path}")
    upgrade(engine)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            insert(Collection.__table__),
            [{"name": COLLECTION, "model_id": model_id, "index_settings": {}, "created_at": now,
              "updated_at": now, "description": "e2e benchmark (synthetic vectors)"}],
        )  # fmt: skip
    for start in range(1, n + 1, chunk):
        ids = range(start, min(n, start + chunk - 1) + 1)
        with engine.begin() as conn:
            conn.execute(
                insert(Item.__table__),
                [{"id": i, "collection": COLLECTION, "status": "indexed",
                  "attributes": {"n": i % 100}, "image_sha256": f"{i:064x}",
                  "content_type": "image/jpeg", "created_at": now, "updated_at": now,
                  "model_id": model_id, "attempts": 0, "indexed_at": now,
                  "search_text": f"synthetic item {i}"} for i in ids],
            )  # fmt: skip
            conn.execute(
                insert(Caption.__table__),
                [{"id": i, "item_id": i, "position": 0, "text": f"synthetic item {i}"}
                 for i in ids],
            )  # fmt: skip
    engine.dispose()


# --- inputs -----------------------------------------------------------------------------------


def query_image() -> bytes:
    """A 640x480 photo-like JPEG (feature benchmark's generator); each request makes it distinct
    bytes with a comment segment (benchmarks/loadgen.py distinct_jpeg)."""
    from benchmarks.feature import synthetic_photos

    return synthetic_photos(1, (640, 480), seed=7)[0]


# --- one scenario ---------------------------------------------------------------------------


@dataclass
class Settings:
    """What the run set, written into the output."""

    env: dict[str, str]
    notes: list[str]


def stack_settings(args: argparse.Namespace, run_id: str) -> Settings:
    limits = {scope: UNLIMITED for scope in ("search:text", "search:image")}
    env = {
        "GATEWAY_RATE_LIMITS": json.dumps(limits),
        "GATEWAY_IP_RATE_LIMIT": json.dumps(UNLIMITED),
        # A fresh prefix per run and model: "miss" phases never meet an earlier run's entries.
        "GATEWAY_CACHE_PREFIX": run_id,
        "FEATURE_RUNTIME": args.feature_runtime,
        # The background drift repair reads every id of the 1M-vector collection: not during
        # a measurement (a production stack runs it every 5 minutes by default).
        "GATEWAY_RECONCILE_INTERVAL_SECONDS": "0",
    }
    for name in ("GATEWAY", "AUTH", "FEATURE", "RETRIEVAL", "METADATA"):
        env[f"{name}_LOG_LEVEL"] = args.log_level
    env["GATEWAY_WORKERS"] = str(args.gateway_workers)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    notes = [
        f"gateway worker processes: {env['GATEWAY_WORKERS']} (GATEWAY_WORKERS; its CPU is the sum "
        "of its processes)",
        "rate limits: search:text, search:image and per-IP buckets set to rate 1,000,000/s, "
        "burst 1,000,000 (the limiter still runs: its Redis calls are measured)",
        "the gateway's background drift repair off (GATEWAY_RECONCILE_INTERVAL_SECONDS=0)",
        f"feature runtime {args.feature_runtime}"
        + (
            " over the model's ONNX export (int8 where a tower keeps parity)"
            if args.feature_runtime == "auto"
            else ""
        )
        + " (the baseline runs torch float32)",
        f"service log level {args.log_level}",
        "search timeout and all other settings: the product defaults unless listed in env",
        "cache prefix per run and model; 'miss': a distinct query every request (texts from "
        "word lists, the JPEG with a distinct comment segment); 'hit': one query, primed",
    ]
    return Settings(env, notes)


def _token(gateway: str) -> str:
    import httpx

    from crossmodal.cli import DEMO_USER

    response = httpx.post(
        f"{gateway}/auth/token",
        data={"grant_type": "password", "username": DEMO_USER[0], "password": DEMO_USER[1]},
        timeout=30,
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


PROBE = "a photo of a small red dog on a table"


def _probe(url: str, token: str | None) -> list[int]:
    """The item ids one text query finds: the same model, index and items on both sides should
    find (nearly) the same ones."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"query": PROBE, "top_k": 10, "target": "image", "collection": COLLECTION}
    response = httpx.post(f"{url}/search/text", json=body, headers=headers, timeout=60)
    response.raise_for_status()
    return [int(r["item_id"]) for r in response.json()["results"]]


class _Counter:
    """Query numbers: each phase starts after every number used before (0 is the hit query)."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, used: int) -> None:
        self.next += used + 1000


def _phase(
    load: Any,
    work: Any,
    clients: int,
    args: argparse.Namespace,
    pids: dict[str, int],
    counter: _Counter,
) -> tuple[Any, dict[str, float]]:
    """Warm-up, then the measured phase with every process' CPU read before and after."""
    from dataclasses import replace

    if work.distinct:
        if args.warmup > 0:
            warm = load.run(replace(work, first_index=counter.next), clients, args.warmup)
            counter.take(warm.issued)
        work = replace(work, first_index=counter.next)
    else:
        # The one repeated query: the warm-up (at least a moment of it) puts it in the cache.
        work = replace(work, first_index=counter.next)
        load.run(work, clients, max(args.warmup, 0.3))
    before = cpu_snapshot(pids)
    result = load.run(work, clients, args.seconds)
    after = cpu_snapshot(pids)
    counter.take(result.issued)
    cpu = cpu_ms_per_request(before, after, result.answered)
    cpu["loadgen"] = result.cpu_seconds * 1000 / max(1, result.answered)
    return result, cpu


def _row(scenario: str, system: str, kind: str, cache: str, clients: int, result: Any) -> Row:
    lat = result.latencies
    return Row(
        scenario,
        system,
        kind,
        cache,
        clients,
        requests=result.statuses.get("200", 0),
        seconds=result.seconds,
        p50_ms=percentile(lat, 50) * 1000,
        p95_ms=percentile(lat, 95) * 1000,
        p99_ms=percentile(lat, 99) * 1000,
        statuses=result.statuses,
        x_cache=result.x_cache,
    )


def wait_for_data_directory(retrieval_dir: Path, timeout: float) -> None:
    """Return once no other process holds the retrieval data directory (an earlier run's
    service still stopping); past ``timeout``, stop with a message instead of starting a
    retrieval service that would wait, unready, for a lock it never gets."""
    from services.retrieval.store import DataDirectoryLocked, lock_data_directory

    deadline = time.monotonic() + timeout
    while True:
        try:
            os.close(lock_data_directory(retrieval_dir))
            return
        except DataDirectoryLocked as exc:
            if time.monotonic() >= deadline:
                raise SystemExit(
                    f"{exc}: stop it first (fuser -v {retrieval_dir / '.lock'} names it)"
                ) from None
        time.sleep(0.5)


def run_services(
    scenario: str, model: Path, data_dir: Path, args: argparse.Namespace, settings: Settings,
    model_id: str, image: bytes, load: Any,
) -> tuple[list[Row], dict[str, Any]]:  # fmt: skip
    import httpx

    from benchmarks.loadgen import Workload
    from crossmodal.stack import SERVICES, LocalStack

    ports = {spec.name: free_port() for spec in SERVICES}
    stack = LocalStack(
        data_dir, model=model, redis_url=args.redis_url, ports=ports, extra_env=settings.env
    )
    rows: list[Row] = []
    print(f"{scenario}: starting the stack", file=sys.stderr)
    wait_for_data_directory(data_dir / "retrieval", timeout=60)
    stack.start(timeout=args.ready_timeout)
    try:
        info = httpx.get(
            f"{stack.url('feature')}/model", headers=stack.service_headers("feature"), timeout=30
        ).json()
        if info["model_id"] != model_id:
            raise SystemExit(f"feature reports {info['model_id']}, vectors carry {model_id}")
        pids = {name: s.process.pid for name, s in stack.services.items() if s.process}
        if (pid := redis_pid(args.redis_url)) is not None:
            pids["redis"] = pid
        gateway = stack.url("gateway")
        host, port = gateway.removeprefix("http://").split(":")
        probe = _probe(gateway, _token(gateway))
        counter = _Counter()
        for kind in args.kinds:
            fields: dict[str, Any] = {"top_k": args.top_k, "target": "image"}
            fields["collection"] = COLLECTION
            for cache in args.cache:
                for clients in args.clients:
                    work = Workload(
                        host, int(port), f"/search/{kind}", kind, fields, _token(gateway),
                        image=image if kind == "image" else None, distinct=cache == "miss",
                    )  # fmt: skip
                    result, cpu = _phase(load, work, clients, args, pids, counter)
                    row = _row(scenario, "services", kind, cache, clients, result)
                    row.cpu_ms = cpu
                    rows.append(row)
                    print(f"  {_brief(row)}", file=sys.stderr)
    finally:
        stack.stop()
    return rows, {"feature_model": info, "pids_measured": sorted(pids), "probe_services": probe}


def run_baseline(
    scenario: str, model: Path, data_dir: Path, args: argparse.Namespace, image: bytes, load: Any
) -> tuple[list[Row], list[int]]:
    import httpx

    from benchmarks.loadgen import Workload

    port = free_port()
    log = data_dir / "logs" / "baseline.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "benchmarks.baseline_app", "--model", str(model)]
    command += ["--data-dir", str(data_dir), "--collection", COLLECTION, "--port", str(port)]
    command += ["--threads", str(args.torch_threads)]
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    rows: list[Row] = []
    print(f"{scenario}: starting the single-process baseline", file=sys.stderr)
    try:
        deadline = time.monotonic() + args.ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the baseline exited; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the baseline was not ready; see {log}")
            time.sleep(0.5)
        pids = {"baseline": process.pid}
        probe = _probe(f"http://127.0.0.1:{port}", None)
        counter = _Counter()
        for kind in args.kinds:
            fields = {"top_k": args.top_k, "target": "image", "collection": COLLECTION}
            for clients in args.clients:
                work = Workload(
                    "127.0.0.1", port, f"/search/{kind}", kind, fields,
                    image=image if kind == "image" else None, distinct=True,
                )  # fmt: skip
                result, cpu = _phase(load, work, clients, args, pids, counter)
                row = _row(scenario, "baseline", kind, "miss", clients, result)
                row.cpu_ms = cpu
                rows.append(row)
                print(f"  {_brief(row)}", file=sys.stderr)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return rows, probe


def _brief(row: Row) -> str:
    return (
        f"{row.system} {row.kind} {row.cache} x{row.clients}: {row.rps:.1f} req/s, "
        f"p99 {_fmt(row.p99_ms)} ms, statuses {row.statuses}, X-Cache {row.x_cache}"
    )


# --- the machine ------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    info = {"cpu": platform.processor() or platform.machine()}
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    info["flags"] = " ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted)
    info["cores"] = str(len(os.sched_getaffinity(0)))
    with contextlib.suppress(OSError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        info["memory"] = f"{kib / 1024 / 1024:.0f} GiB"
    info["python"] = platform.python_version()
    from importlib.metadata import PackageNotFoundError, version

    for package in ("torch", "transformers", "faiss-cpu", "fastapi", "uvicorn", "redis"):
        with contextlib.suppress(PackageNotFoundError):
            info[package] = version(package)
    return info


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.feature import csv_list

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds per phase)")
    parser.add_argument("--models", type=csv_list, help="demo,vit-b32 (quick: demo)")
    parser.add_argument("--clients", type=lambda v: [int(x) for x in csv_list(v)], help="1,8,32,64")
    parser.add_argument("--kinds", type=csv_list, help="text,image")
    parser.add_argument("--cache", type=csv_list, help="miss,hit")
    parser.add_argument("--seconds", type=float, help="measured seconds per phase (20)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds before each phase (3)")
    parser.add_argument("--vectors", type=int, help="collection size (1,000,000; quick 2,000)")
    parser.add_argument("--index", default="auto", help="Faiss factory of the collection")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=2,
        help="GATEWAY_WORKERS (2: one per core of the development machine)",
    )
    parser.add_argument(
        "--feature-runtime",
        default="auto",
        help="FEATURE_RUNTIME; auto (default): the model's ONNX export with int8 towers where "
        "they keep parity, as `make run` serves the demo; torch: the checkpoint in float32",
    )
    parser.add_argument("--torch-threads", type=int, default=2, help="the baseline's (feature: 2)")
    parser.add_argument("--log-level", default="info", help="the services' (product: info)")
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for the services (repeatable)"
    )
    parser.add_argument("--systems", type=csv_list, help="services,baseline (both)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--ready-timeout", type=float, default=1800.0)
    parser.add_argument(
        "--out", type=Path, help="JSON results (var/bench/e2e/results.json; quick: quick.json)"
    )
    parser.add_argument("--markdown", type=Path, help="the report (default: --out with .md)")
    args = parser.parse_args(argv)
    defaults: dict[str, Any] = {
        "models": ["demo", "vit-b32"],
        "clients": [1, 8, 32, 64],
        "kinds": ["text", "image"],
        "cache": ["miss", "hit"],
        "seconds": 20.0,
        "warmup": 3.0,
        "vectors": 1_000_000,
        "out": E2E_DIR / "results.json",
        "systems": ["services", "baseline"],
    }
    if args.quick:
        defaults.update(
            models=["demo"], clients=[1, 8], seconds=3.0, warmup=1.0, vectors=2000,
            out=E2E_DIR / "quick.json",
        )  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.markdown is None:
        args.markdown = args.out.with_suffix(".md")
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}: {', '.join(MODELS)}")
    return args


def _probe_lines(models: dict[str, Any]) -> list[str]:
    lines = []
    for name, info in models.items():
        ours, base = info.get("probe_services"), info.get("probe_baseline")
        if ours is not None and base is not None:
            shared = len(set(ours) & set(base))
            lines.append(
                f'Same work on both sides ({name}): the query "{PROBE}" found {shared} of the '
                f"same top {max(len(ours), len(base))} items through the services and the single "
                "process."
            )
        runtime = info.get("feature_model", {})
        if runtime:
            lines.append(
                f"Feature service ({name}): runtime {runtime.get('runtime')}, dtype "
                f"{runtime.get('dtype')}, model_id `{runtime.get('model_id')}`, dim "
                f"{runtime.get('dim')}."
            )
    return [*lines, ""] if lines else []


def render_report(result: dict[str, Any]) -> str:
    rows = [Row(**r) for r in result["rows"]]
    env = ", ".join(f"{k} {v}" for k, v in result["machine"].items())
    lines = [
        "## End-to-end search benchmark",
        "",
        f"Date: {result['date']}. Command: `{result['command']}`.",
        f"Machine: {env}.",
        f"Collection: {result['vectors']:,} vectors per model, index {result['index']}; "
        f"{result['seconds']:g} s per phase after {result['warmup']:g} s of warm-up; top_k "
        f"{result['top_k']}, target=image for both kinds.",
        "",
        "Settings: " + "; ".join(result["settings"]["notes"]) + ".",
        "Environment set: "
        + ", ".join(f"`{k}={v}`" for k, v in sorted(result["settings"]["env"].items()))
        + ".",
        "",
        render_table(rows),
        "",
        *_probe_lines(result["models"]),
        "Headline (services with the cache missing / the single process):",
        "",
        render_headline(result["headline"]),
        "",
    ]
    return "\n".join(lines)


def _exit_on_sigterm(signum: int, _: Any) -> None:
    # `timeout` and `kill` send SIGTERM: unwind, so every stack started is stopped on the way
    # out instead of being left holding its ports and data directory.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    from benchmarks.loadgen import LoadProcess

    started = time.monotonic()
    run_id = "e2e-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    settings = stack_settings(args, run_id)
    image = query_image()
    rows: list[Row] = []
    models: dict[str, Any] = {}
    with LoadProcess() as load:
        for name in args.models:
            path, model_id, dim = model_info(name)
            data_dir = E2E_DIR / f"{name}-{args.vectors}"
            print(f"{name}: data in {data_dir} ({args.vectors:,} x {dim})", file=sys.stderr)
            prepare_data(data_dir, model_id=model_id, dim=dim, n=args.vectors, index=args.index)
            scenario = MODELS[name]
            scenario_settings = Settings(
                {**settings.env, "GATEWAY_CACHE_PREFIX": f"{run_id}-{name}"}, settings.notes
            )
            info: dict[str, Any] = {}
            if "services" in args.systems:
                served = path
                if args.feature_runtime == "auto":
                    # What `make run` does: serve the model's ONNX export (same model id).
                    from crossmodal.demo.emoji_model import ensure_served_export

                    served = ensure_served_export(path, path.with_name(f"{path.name}-served"))
                new_rows, info = run_services(
                    scenario, served, data_dir, args, scenario_settings, model_id, image, load
                )
                rows += new_rows
            if "baseline" in args.systems:
                base_rows, info["probe_baseline"] = run_baseline(
                    scenario, path, data_dir, args, image, load
                )
                rows += base_rows
            models[name] = {"path": str(path), "model_id": model_id, "dim": dim, **info}
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(
            ["python -m benchmarks.e2e", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "vectors": args.vectors,
        "index": args.index,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "top_k": args.top_k,
        "settings": asdict(settings),
        "models": models,
        "rows": [asdict(r) for r in rows],
        "headline": headline(rows),
        "elapsed_s": time.monotonic() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    report = render_report(result)
    print(report)
    args.markdown.write_text(report, encoding="utf-8")
    print(f"done in {result['elapsed_s']:.0f}s; JSON in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
