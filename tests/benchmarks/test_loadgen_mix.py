"""The pure parts of the soak (benchmarks/soak.py) and its mixed workload (benchmarks/loadgen.py):
mix weights and order, pacing, the ingest window, the p99 windows, memory growth and the goals;
and one short mixed run against a stub HTTP server on loopback (no stack)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections import Counter

import pytest

from benchmarks.loadgen import (
    DEFAULT_MIX,
    IngestWindow,
    KindStats,
    MixResult,
    MixWorkload,
    build_delete,
    build_mix_request,
    mix_order,
    parse_mix,
    query_text,
    run_mix,
    slot_time,
)
from benchmarks.soak import (
    error_counts,
    growth_percent,
    memory_table,
    p99_windows,
    verdicts,
    window_latencies,
)

JPEG = b"\xff\xd8\xff\xe0fake-jpeg-body\xff\xd9"


def test_parse_mix_reads_weights_and_refuses_nonsense() -> None:
    assert parse_mix("text-miss=3, ingest=1") == {"text-miss": 3, "ingest": 1}
    with pytest.raises(ValueError, match="unknown kind"):
        parse_mix("text=1")
    with pytest.raises(ValueError, match="positive integer"):
        parse_mix("ingest=0")
    with pytest.raises(ValueError, match="empty"):
        parse_mix(" , ")


def test_mix_order_carries_each_kind_as_often_as_its_weight_and_spread_out() -> None:
    order = mix_order(DEFAULT_MIX)
    assert Counter(order) == DEFAULT_MIX
    assert order == mix_order(DEFAULT_MIX)  # deterministic
    total = sum(DEFAULT_MIX.values())
    for kind, weight in DEFAULT_MIX.items():
        # Over the cycle repeated, the gap between two of a kind stays near total / weight.
        positions = [i for i, k in enumerate(order * 2) if k == kind]
        gaps = [b - a for a, b in itertools.pairwise(positions)]
        assert max(gaps) <= math.ceil(total / weight) + 1, (kind, gaps)
    assert mix_order({"ingest": 1}) == ["ingest"]


def test_slots_are_paced_by_rate() -> None:
    assert slot_time(0, 70.0) == 0.0
    assert slot_time(70, 70.0) == pytest.approx(1.0)
    times = [slot_time(i, 12.5) for i in range(100)]
    assert all(b - a == pytest.approx(0.08) for a, b in itertools.pairwise(times))


def test_the_ingest_window_deletes_the_oldest_past_its_size() -> None:
    window = IngestWindow(3)
    assert [window.added(i) for i in range(1, 6)] == [[], [], [], [1], [2]]
    assert list(window.items) == [3, 4, 5]
    # Items left by an earlier run count (and go first).
    window = IngestWindow(2, (7, 8, 9))
    assert window.added(10) == [7, 8]
    assert len(window) == 2


def test_p99_windows_are_five_minutes_or_a_fifth_of_a_short_run() -> None:
    assert p99_windows(1800, 10) == ((0, 30), (150, 180))
    assert p99_windows(600, 10) == ((0, 30), (30, 60))
    assert p99_windows(120, 10) == ((0, 2), (10, 12))
    assert p99_windows(180.4, 10) == ((0, 4), (14, 18))  # 36 s: rounded to whole intervals
    assert p99_windows(5, 10) == ((0, 1), (0, 1))


def test_window_latencies_take_every_kind_of_the_windows_intervals() -> None:
    result = MixResult(interval_s=10)
    for n in range(4):
        result.intervals.append(
            {"text-miss": KindStats([float(n)]), "ingest": KindStats([n + 0.5])}
        )
    assert sorted(window_latencies(result, (0, 2))) == [0.0, 0.5, 1.0, 1.5]
    assert sorted(window_latencies(result, (3, 4))) == [3.0, 3.5]
    assert result.totals(1, 3)["ingest"].latencies == [1.5, 2.5]


def test_memory_is_measured_from_the_end_of_the_warmup() -> None:
    samples = [
        (0.0, {"gateway": 50, "redis": 10}),
        (5.0, {"gateway": 90, "redis": 10}),
        (10.0, {"gateway": 100, "redis": 12}),
        (15.0, {"gateway": 104}),
    ]
    table = memory_table(samples, warmup_s=6.0)
    assert table["gateway"]["after_warmup_kib"] == 100
    assert table["gateway"]["growth_pct"] == pytest.approx(4.0)
    assert "redis" not in table  # not seen at the end
    assert memory_table([], 6.0) == {}
    assert math.isnan(growth_percent(0, 5))


def test_errors_and_goals() -> None:
    totals = {
        "text-miss": KindStats(statuses={"200": 5, "503": 2, "ConnectionResetError": 1}),
        "delete": KindStats(statuses={"204": 3, "404": 1}),
    }
    assert error_counts(totals) == (2, 1)
    memory = {"gateway": {"growth_pct": 1.0}, "feature": {"growth_pct": 6.0}}
    goals = verdicts(0, 0, 1.15, memory, judged=("gateway", "feature"))
    assert [k for k, ok in goals.items() if not ok] == ["feature memory growth < 5 %"]
    goals = verdicts(1, 0, 0.7, {"gateway": {"growth_pct": 0.0}}, judged=("gateway",))
    assert [k for k, ok in goals.items() if not ok] == ["no 5xx", "p99 last / first within 20%"]


def _work(**overrides: object) -> MixWorkload:
    fields: dict = dict(
        host="127.0.0.1", port=1, token="t0k", collection="bench", ingest_collection="soak-x",
        image=JPEG, ingest_image=JPEG,
    )  # fmt: skip
    return MixWorkload(**(fields | overrides))


def test_mix_requests() -> None:
    work = _work()
    ingest = build_mix_request(work, "t0k", "ingest", 12)
    assert ingest.startswith(b"POST /items HTTP/1.1")
    assert b"soak-x" in ingest and b"soak item 12" in ingest
    assert build_mix_request(work, "t0k", "ingest", 13) != ingest
    # "hit" kinds send the same query whatever the slot, "miss" kinds another one each time.
    assert build_mix_request(work, "a", "text-hit", 5) == build_mix_request(
        work, "a", "text-hit", 6
    )
    assert build_mix_request(work, "a", "image-hit", 5) == build_mix_request(
        work, "a", "image-hit", 6
    )
    miss = build_mix_request(work, "a", "text-miss", 5)
    assert miss.startswith(b"POST /search/text ") and query_text(5).encode() in miss
    head, body = build_mix_request(work, "a", "image-miss", 5).split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /search/image ")
    assert f"Content-Length: {len(body)}".encode() in head
    assert build_delete(work, "a", 42).startswith(b"DELETE /items/42 HTTP/1.1")


async def _stub_server() -> tuple[asyncio.Server, Counter[str]]:
    """A keep-alive HTTP/1.1 server: 200 for searches, 201 with a new id for POST /items, 204
    (no Content-Length, as Starlette answers) for DELETE, a token "renewed" at /auth/token."""
    seen: Counter[str] = Counter()
    ids = iter(range(1, 1_000_000))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                method, path = head.split(b" ")[:2]
                seen[f"{method.decode()} {path.decode().split('/')[1]}"] += 1
                if b"Bearer renewed" in head:
                    seen["renewed token"] += 1
                if method == b"DELETE":
                    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                    continue
                if path == b"/auth/token":
                    status, body = "200 OK", b'{"access_token": "renewed"}'
                elif path == b"/items":
                    status, body = "201 Created", json.dumps({"id": next(ids)}).encode()
                else:
                    status, body = "200 OK", b'{"results": []}'
                writer.write(
                    f"HTTP/1.1 {status}\r\nx-cache: miss\r\nContent-Length: {len(body)}\r\n\r\n"
                    .encode() + body
                )  # fmt: skip
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), seen


def test_a_paced_mix_run_against_a_stub_keeps_rate_mix_window_and_token() -> None:
    async def scenario() -> tuple[MixResult, Counter[str]]:
        server, seen = await _stub_server()
        port = server.sockets[0].getsockname()[1]
        work = _work(
            port=port, window=3, window_items=(101, 102), interval_s=0.25,
            login=("demo", "pw"), renew_s=0.3,
        )  # fmt: skip
        async with server:
            result = await run_mix(work, seconds=1.0, rate=200.0, clients=8)
        return result, seen

    result, seen = asyncio.run(scenario())
    assert result.slots == 200  # every slot of one second at 200/s, no more
    totals = result.totals()
    assert {k: sum(s.statuses.values()) for k, s in totals.items() if k != "delete"} == {
        k: 2 * w for k, w in DEFAULT_MIX.items()
    }
    assert totals["ingest"].statuses == {"201": 20}
    # 2 left by an earlier run + 20 new, 3 kept: 19 deleted, the earlier run's first.
    assert totals["delete"].statuses == {"204": 19}
    assert len(result.window_items) == 3 and 101 not in result.window_items
    assert seen["DELETE items"] == 19
    assert len(result.intervals) == 4  # 1 s in 0.25 s intervals
    assert all(len(s.latencies) == sum(s.statuses.values()) for s in totals.values())
    # The token renewed while the run went on, and sent from then on.
    assert result.renewals.get("renewed", 0) >= 1 and seen["POST auth"] >= 1
    assert seen["renewed token"] > 0
