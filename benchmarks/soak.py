"""Soak: a mix of searches and ingests at a steady share of capacity, for a long time.

    python -m benchmarks.soak --minutes 30          # make soak
    python -m benchmarks.soak --minutes 3           # a short run

It starts the stack with ``crossmodal.stack.LocalStack`` (as benchmarks/e2e.py does, over a small
bulk-built collection: the emoji demo model, 2,000 vectors), then

1. measures capacity: the mix (text and image searches, cache missing and hitting, ingests) from
   a closed loop of ``--capacity-clients`` for ``--capacity-seconds``, in slots a second;
2. drives the same mix, paced, at ``--load`` of that rate for ``--minutes`` (benchmarks/loadgen.py
   ``run_mix``; an ingest adds a new item to a collection of the run's own and, past
   ``--window`` items, deletes the oldest, so the data stays the same size), sampling each
   service's resident memory (and redis-server's) every ``--interval`` seconds;
3. reports 5xx and transport errors (goal 0), the p99 of the first and last five minutes (of
   the first and last fifth for runs under 10 minutes; goal: within 20 % of each other), and
   each service's memory after the warm-up and at the end (goal: growth under 5 %).

It prints a markdown report (also written with --markdown), writes every figure as JSON (--out),
and exits 1 when a goal is not met, naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.e2e import (
    COLLECTION,
    UNLIMITED,
    cpu_snapshot,
    free_port,
    machine,
    model_info,
    percentile,
    prepare_data,
    query_image,
    redis_pid,
    wait_for_data_directory,
)
from benchmarks.loadgen import (
    DEFAULT_MIX,
    RESULT_KINDS,
    SUCCESS,
    KindStats,
    LoadProcess,
    MixResult,
    MixWorkload,
    parse_mix,
)
from shared.metrics import process_group_usage

ROOT = Path(__file__).resolve().parents[1]
SOAK_DIR = ROOT / "var" / "bench" / "soak"
SERVICES = ("gateway", "auth", "feature", "retrieval", "metadata")
WINDOW_S = 300.0  # the "first and last five minutes"
P99_TOLERANCE = 0.20
MEMORY_GROWTH_GOAL = 5.0  # per cent
# Redis is measured, not judged: the instance may be shared, and distinct queries fill the
# caches by design until their TTL (pages 300 s, embeddings 3,600 s).
JUDGED = SERVICES


# --- pure helpers (tested in tests/benchmarks/test_loadgen_mix.py) ----------------------------


def p99_windows(seconds: float, interval_s: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """The first and last windows the p99 goal compares, as [start, end) interval numbers: the
    first and last five minutes, or for a run under 10 minutes its first and last fifth (at
    least one interval each)."""
    intervals = max(1, round(seconds / interval_s))
    span = WINDOW_S if seconds >= 2 * WINDOW_S else seconds / 5
    n = max(1, min(intervals, round(span / interval_s)))
    return (0, n), (intervals - n, intervals)


def window_latencies(result: MixResult, window: tuple[int, int]) -> list[float]:
    """The latencies of every successful request whose slot fell in ``window``."""
    return [latency for stats in result.totals(*window).values() for latency in stats.latencies]


def growth_percent(before: float, after: float) -> float:
    return (after - before) / before * 100 if before > 0 else float("nan")


def memory_table(
    samples: Sequence[tuple[float, dict[str, int]]], warmup_s: float
) -> dict[str, dict[str, float]]:
    """Per process: RSS (KiB) at the first sample at or after the warm-up, at the last sample,
    and the growth between, from ``samples`` of (seconds into the run, {process: KiB})."""
    after = [s for s in samples if s[0] >= warmup_s] or list(samples[-1:])
    if not after:
        return {}
    first, last = after[0], after[-1]
    return {
        name: {
            "after_warmup_kib": first[1][name],
            "end_kib": last[1][name],
            "at_s": first[0],
            "end_s": last[0],
            "growth_pct": growth_percent(first[1][name], last[1][name]),
        }
        for name in first[1]
        if name in last[1]
    }


def error_counts(totals: dict[str, KindStats]) -> tuple[int, int]:
    """(5xx answers, transport errors: no answer at all) over every kind."""
    server = transport = 0
    for stats in totals.values():
        for status, n in stats.statuses.items():
            if not status.isdigit():
                transport += n
            elif status.startswith("5"):
                server += n
    return server, transport


def verdicts(
    server_errors: int,
    transport_errors: int,
    p99_ratio: float,
    memory: dict[str, dict[str, float]],
    judged: Sequence[str] = JUDGED,
) -> dict[str, bool]:
    """Each goal: met or not."""
    out = {
        "no 5xx": server_errors == 0,
        "no transport errors": transport_errors == 0,
        f"p99 last / first within {P99_TOLERANCE:.0%}": abs(p99_ratio - 1) <= P99_TOLERANCE,
    }
    for name in judged:
        growth = memory.get(name, {}).get("growth_pct", float("nan"))
        out[f"{name} memory growth < {MEMORY_GROWTH_GOAL:g} %"] = growth < MEMORY_GROWTH_GOAL
    return out


# --- memory -----------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and every process under it (a gateway's workers), KiB."""
    return process_group_usage(pid).rss_bytes // 1024


def rss_snapshot(pids: dict[str, int]) -> dict[str, int]:
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, ValueError):
            out[name] = rss_kib(pid)
    return out


def run_sampled(
    pending: Any, pids: dict[str, int], interval_s: float
) -> tuple[MixResult, list[tuple[float, dict[str, int]]], list[tuple[float, dict[str, float]]]]:
    """Wait for a mixed run submitted to the load process (``LoadProcess.submit_mix``),
    sampling every process' RSS and CPU time each ``interval_s``. Returns the run, the RSS
    samples (seconds into the run by the load process' clock, {process: KiB}) and each
    process' CPU use between samples (same clock, {process: % of a core}), those outside the
    run left out: the CPU shows what a latency spike coincides with."""
    stamped: list[tuple[float, dict[str, int], dict[str, float]]] = []
    while not pending.ready():
        stamped.append((time.time(), rss_snapshot(pids), cpu_snapshot(pids)))
        pending.wait(interval_s)
    result: MixResult = pending.get()

    def inside(t: float) -> bool:
        return 0 <= t - result.started_at <= result.seconds

    rss = [(t - result.started_at, r) for t, r, _ in stamped if inside(t)]
    cpu = [
        (t1 - result.started_at, {n: (c1[n] - c0[n]) / (t1 - t0) * 100 for n in c1 if n in c0})
        for (t0, _, c0), (t1, _, c1) in itertools.pairwise(stamped)
        if inside(t1)
    ]
    return result, rss, cpu


# --- the run ------------------------------------------------------------------------------------


def stack_env(args: argparse.Namespace, run_id: str) -> tuple[dict[str, str], list[str]]:
    limits = {s: UNLIMITED for s in ("search:text", "search:image", "items:write", "items:read")}
    env = {
        "GATEWAY_RATE_LIMITS": json.dumps(limits),
        "GATEWAY_IP_RATE_LIMIT": json.dumps(UNLIMITED),
        "GATEWAY_CACHE_PREFIX": run_id,
        "FEATURE_RUNTIME": args.feature_runtime,
        # The drift repair takes the bulk-built items (no image, no text vectors) for broken:
        # each round marked 100 failed and deleted their vectors, a write that emptied the
        # searched collection's cache mid-run (a p99 spike, hit kinds missing) and shrank it.
        "GATEWAY_RECONCILE_INTERVAL_SECONDS": "0",
    }
    for name in ("GATEWAY", "AUTH", "FEATURE", "RETRIEVAL", "METADATA"):
        env[f"{name}_LOG_LEVEL"] = args.log_level
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    notes = [
        "rate limits: search:text, search:image, items:write, items:read and per-IP buckets at "
        "rate 1,000,000/s, burst 1,000,000 (the limiter still runs)",
        f"feature runtime {args.feature_runtime}, service log level {args.log_level}",
        "the gateway's background drift repair off (GATEWAY_RECONCILE_INTERVAL_SECONDS=0: it "
        "takes the bulk-built items, which have no image, for broken)",
        "every other setting at its product default (the 2 s search budget, cache TTLs)",
        f"cache prefix {run_id}: 'miss' kinds send a distinct query every time (word-list "
        "captions; the JPEG with a distinct comment segment), 'hit' kinds one query",
        f"searches: top_k {args.top_k}, target=image, collection '{COLLECTION}' "
        f"({args.vectors:,} bulk-built vectors); ingests: a distinct JPEG and a caption into "
        f"a collection of the run's own, the oldest deleted past {args.window} items",
        "access token renewed by the load process every 10 minutes (it lasts 15)",
    ]
    return env, notes


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


def _kind_rows(
    result: MixResult, first: tuple[int, int], last: tuple[int, int]
) -> list[dict[str, Any]]:
    totals, early, late = result.totals(), result.totals(*first), result.totals(*last)
    rows = []
    for kind in RESULT_KINDS:
        if kind not in totals:
            continue
        stats = totals[kind]
        ok = stats.statuses.get(SUCCESS.get(kind, "200"), 0)
        rows.append(
            {
                "kind": kind,
                "requests": sum(stats.statuses.values()),
                "ok": ok,
                "statuses": stats.statuses,
                "x_cache": stats.x_cache,
                "p50_ms": percentile(stats.latencies, 50) * 1000,
                "p99_ms": percentile(stats.latencies, 99) * 1000,
                "p99_first_ms": percentile(early.get(kind, KindStats()).latencies, 99) * 1000,
                "p99_last_ms": percentile(late.get(kind, KindStats()).latencies, 99) * 1000,
            }
        )
    return rows


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """The whole soak; every figure, goals and verdicts included, as a JSON-able dict."""
    import httpx

    from crossmodal.cli import DEMO_USER
    from crossmodal.stack import SERVICES as SPECS
    from crossmodal.stack import LocalStack

    started = time.monotonic()
    # Also the ingest collection's name: lower case, as collection names must be.
    run_id = "soak-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    env, notes = stack_env(args, run_id)
    path, model_id, dim = model_info(args.model)
    data_dir = args.data_dir or SOAK_DIR / f"{path.name}-{args.vectors}"
    print(f"soak: data in {data_dir} ({args.vectors:,} x {dim})", file=sys.stderr)
    prepare_data(data_dir, model_id=model_id, dim=dim, n=args.vectors, index="auto")
    served = path
    if args.feature_runtime == "auto":
        # What `make run` does: serve the model's ONNX export (the same model id).
        from crossmodal.demo.emoji_model import ensure_served_export

        served = ensure_served_export(path, path.with_name(f"{path.name}-served"))
    stack = LocalStack(
        data_dir,
        model=served,
        redis_url=args.redis_url,
        ports={spec.name: free_port() for spec in SPECS},
        extra_env=env,
    )
    wait_for_data_directory(data_dir / "retrieval", timeout=60)
    print("soak: starting the stack", file=sys.stderr)
    stack.start(timeout=args.ready_timeout)
    try:
        gateway = stack.url("gateway")
        host, port = gateway.removeprefix("http://").split(":")
        pids = {n: s.process.pid for n, s in stack.services.items() if s.process}
        if (pid := redis_pid(args.redis_url)) is not None:
            pids["redis"] = pid
        token = _token(gateway)
        work = MixWorkload(
            host, int(port), token, COLLECTION, run_id, image=query_image(),
            ingest_image=_ingest_image(), weights=args.mix, top_k=args.top_k,
            window=args.window, interval_s=args.interval, login=DEMO_USER,
        )  # fmt: skip
        with LoadProcess() as load:
            # Warm-up (not measured): models loaded, the "hit" queries cached, the ingest
            # collection created.
            warm = load.submit_mix(work, args.prime_seconds, None, 2).get()
            work = replace(work, first_index=work.first_index + warm.slots + 1000)
            work = replace(work, window_items=warm.window_items)
            print(f"soak: capacity, {args.capacity_seconds:g} s", file=sys.stderr)
            cap = load.submit_mix(work, args.capacity_seconds, None, args.capacity_clients).get()
            capacity = cap.slots / cap.seconds
            rate = capacity * args.load
            work = replace(work, first_index=work.first_index + cap.slots + 1000)
            work = replace(work, window_items=cap.window_items)
            print(
                f"soak: capacity {capacity:.1f} slots/s; {args.minutes:g} min at {rate:.1f}/s",
                file=sys.stderr,
            )
            pending = load.submit_mix(work, args.minutes * 60, rate, args.connections)
            result, samples, cpu = run_sampled(pending, pids, args.interval)
        with httpx.Client(base_url=gateway, timeout=30) as client:
            auth = {"Authorization": f"Bearer {_token(gateway)}"}
            described = client.get(f"/collections/{run_id}", headers=auth).json()
            if not args.keep_collection:
                client.delete(f"/collections/{run_id}", headers=auth)
    finally:
        stack.stop()
    return summarize(args, argv, result, samples, capacity, rate, cap, described, notes, env) | {
        "cpu_samples": cpu,
        "elapsed_s": time.monotonic() - started,
        "data_dir": str(data_dir),
        "model_id": model_id,
    }


def _ingest_image() -> bytes:
    """Another photo-like JPEG than the search queries' (its embedding is not cached)."""
    from benchmarks.feature import synthetic_photos

    return synthetic_photos(1, (320, 240), seed=11)[0]


def summarize(
    args: argparse.Namespace, argv: Sequence[str], result: MixResult,
    samples: list[tuple[float, dict[str, int]]], capacity: float, rate: float, cap: MixResult,
    described: dict[str, Any], notes: list[str], env: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    first, last = p99_windows(result.seconds, result.interval_s)
    p99_first = percentile(window_latencies(result, first), 99) * 1000
    p99_last = percentile(window_latencies(result, last), 99) * 1000
    ratio = p99_last / p99_first if p99_first > 0 else float("nan")
    totals = result.totals()
    server, transport = error_counts(totals)
    warmup = args.warmup if args.warmup is not None else min(60.0, result.seconds / 10)
    memory = memory_table(samples, warmup)
    goals = verdicts(server, transport, ratio, memory)
    answered = sum(sum(s.statuses.values()) for s in totals.values())
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m benchmarks.soak", *argv]),
        "machine": machine(),
        "minutes": args.minutes,
        "load": args.load,
        "mix": args.mix,
        "window": args.window,
        "settings": {"notes": notes, "env": env},
        "capacity": {
            "slots_per_s": capacity,
            "clients": args.capacity_clients,
            "seconds": cap.seconds,
            "statuses": {k: v.statuses for k, v in cap.totals().items()},
        },
        "target_rate": rate,
        "achieved_rate": result.slots / result.seconds if result.seconds else 0.0,
        "requests_per_s": answered / result.seconds if result.seconds else 0.0,
        "seconds": result.seconds,
        "slots": result.slots,
        "late": result.late,
        "connections": args.connections,
        "loadgen_cpu_s": result.cpu_seconds,
        "token_renewals": result.renewals,
        "kinds": _kind_rows(result, first, last),
        "server_errors": server,
        "transport_errors": transport,
        "p99_windows_s": [
            [first[0] * result.interval_s, first[1] * result.interval_s],
            [last[0] * result.interval_s, last[1] * result.interval_s],
        ],
        "p99_first_ms": p99_first,
        "p99_last_ms": p99_last,
        "p99_ratio": ratio,
        "warmup_s": warmup,
        "memory": memory,
        "memory_samples": samples,
        # Per interval and kind, without the latencies: where in the run something happened.
        "intervals": [
            {kind: _brief(stats) for kind, stats in interval.items()}
            for interval in result.intervals
        ],
        "ingest_collection": {
            "name": described.get("name"),
            "items": described.get("items"),
            "counts": described.get("counts"),
            "window": args.window,
        },
        "goals": goals,
        "goals_met": all(goals.values()),
    }


# --- the report ---------------------------------------------------------------------------------


def _brief(stats: KindStats) -> dict[str, Any]:
    return {
        "statuses": stats.statuses,
        "x_cache": stats.x_cache,
        "p99_ms": percentile(stats.latencies, 99) * 1000,
    }


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def render_report(r: dict[str, Any]) -> str:
    (f0, f1), (l0, l1) = r["p99_windows_s"]
    goals = r["goals"]
    p99_goal = next(k for k in goals if k.startswith("p99"))
    m = r["machine"]
    lines = [
        "## Soak",
        "",
        f"Date: {r['date']}. Command: `{r['command']}`.",
        f"Machine: {m.get('cpu')}, flags {m.get('flags')}, {m.get('cores')} cores, "
        f"{m.get('memory', '?')}, Python {m.get('python')}.",
        "Settings: " + "; ".join(r["settings"]["notes"]) + ".",
        "Mix (weights per slot): "
        + ", ".join(f"{k} {v}" for k, v in r["mix"].items())
        + "; an ingest past the window also deletes the oldest soak item.",
        "",
        "| measure | value | goal |",
        "|---|---:|---|",
        f"| capacity (the mix, closed loop, {r['capacity']['clients']} clients, "
        f"{r['capacity']['seconds']:.0f} s) | {_f(r['capacity']['slots_per_s'])} slots/s | |",
        f"| target ({r['load']:.0%} of capacity) | {_f(r['target_rate'])} slots/s | |",
        f"| achieved, {r['seconds'] / 60:.1f} min | {_f(r['achieved_rate'])} slots/s "
        f"({_f(r['requests_per_s'])} requests/s; {r['late']} sent > 100 ms late) | |",
        f"| load generator CPU | {r['loadgen_cpu_s']:.0f} s "
        f"({r['loadgen_cpu_s'] / r['seconds']:.0%} of a core) | |",
        f"| 5xx | {r['server_errors']} | 0: {_met(goals['no 5xx'])} |",
        f"| transport errors | {r['transport_errors']} | 0: {_met(goals['no transport errors'])} |",
        f"| p99, all requests, first window ({f0:.0f}–{f1:.0f} s) | {_f(r['p99_first_ms'])} ms | |",
        f"| p99, all requests, last window ({l0:.0f}–{l1:.0f} s) | {_f(r['p99_last_ms'])} ms | |",
        f"| p99 last / first | {_f(r['p99_ratio'], 2)} | 0.80–1.20: {_met(goals[p99_goal])} |",
        f"| ingest collection at the end | {r['ingest_collection']['items']} items indexed "
        f"(window {r['window']}) | |",
        "",
        "| kind | requests | statuses | X-Cache | p50 ms | p99 ms | p99 first window | "
        "p99 last window |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for k in r["kinds"]:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(k["statuses"].items()))
        caches = ", ".join(f"{c} {n}" for c, n in sorted(k["x_cache"].items()))
        lines.append(
            f"| {k['kind']} | {k['requests']:,} | {statuses} | {caches} | {_f(k['p50_ms'])} | "
            f"{_f(k['p99_ms'])} | {_f(k['p99_first_ms'])} | {_f(k['p99_last_ms'])} |"
        )
    lines += [
        "",
        f"| process | RSS after warm-up ({r['warmup_s']:.0f} s) MiB | at the end MiB | growth | "
        f"goal (< {MEMORY_GROWTH_GOAL:g} %) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, mem in r["memory"].items():
        key = f"{name} memory growth < {MEMORY_GROWTH_GOAL:g} %"
        goal = _met(goals[key]) if key in goals else "not judged (shared; caches fill to TTL)"
        lines.append(
            f"| {name} | {_f(mem['after_warmup_kib'] / 1024)} | {_f(mem['end_kib'] / 1024)} | "
            f"{mem['growth_pct']:+.1f} % | {goal} |"
        )
    failed = [k for k, ok in goals.items() if not ok]
    lines += ["", "Goals: " + ("all met." if not failed else "not met: " + "; ".join(failed) + ".")]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="paced load (30)")
    parser.add_argument("--load", type=float, default=0.7, help="share of capacity (0.7)")
    parser.add_argument(
        "--mix",
        type=parse_mix,
        default=dict(DEFAULT_MIX),
        help="weights: " + ",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items()),
    )
    parser.add_argument("--capacity-seconds", type=float, default=30.0)
    parser.add_argument("--capacity-clients", type=int, default=8)
    parser.add_argument("--prime-seconds", type=float, default=5.0, help="unmeasured warm-up")
    parser.add_argument(
        "--warmup", type=float, help="seconds before the memory baseline (min(60, 10 %% of run))"
    )
    parser.add_argument("--interval", type=float, default=10.0, help="sampling, seconds (10)")
    parser.add_argument("--connections", type=int, default=32, help="of the paced load (32)")
    parser.add_argument("--window", type=int, default=200, help="soak items kept (200)")
    parser.add_argument("--model", default="demo", help="demo, vit-b32 or a model folder")
    parser.add_argument("--vectors", type=int, default=2000, help="searched collection (2,000)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--feature-runtime", default="auto", help="FEATURE_RUNTIME (auto)")
    parser.add_argument("--log-level", default="info", help="the services' (product: info)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE (repeatable)")
    parser.add_argument("--data-dir", type=Path, help="default var/bench/soak/<model>-<vectors>")
    parser.add_argument("--keep-collection", action="store_true", help="keep the soak items")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=SOAK_DIR / "results.json")
    parser.add_argument("--markdown", type=Path, help="default: --out with .md")
    args = parser.parse_args(argv)
    if args.markdown is None:
        args.markdown = args.out.with_suffix(".md")
    return args


def _exit_on_sigterm(signum: int, _: Any) -> None:
    # `timeout` and `kill` send SIGTERM: unwind, so the stack is stopped on the way out.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    result = run(args, argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    report = render_report(result)
    print(report)
    args.markdown.write_text(report, encoding="utf-8")
    print(f"done in {result['elapsed_s']:.0f}s; JSON in {args.out}", file=sys.stderr)
    return 0 if result["goals_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
