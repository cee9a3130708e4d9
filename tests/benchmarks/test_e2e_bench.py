"""The pure parts of the end-to-end benchmark harness (benchmarks/e2e.py, benchmarks/loadgen.py):
percentiles, CPU accounting, the distinct queries, the tables, and the wait for a data
directory an earlier run still holds. No stack, no timing."""

from __future__ import annotations

import io
import math
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.e2e import (
    Row,
    cpu_ms_per_request,
    headline,
    percentile,
    render_table,
    wait_for_data_directory,
)
from benchmarks.loadgen import Workload, build_request, distinct_jpeg, query_text
from services.retrieval.store import lock_data_directory


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_cpu_per_request_divides_the_difference() -> None:
    before = {"gateway": 1.0, "feature": 10.0, "gone": 2.0}
    after = {"gateway": 1.5, "feature": 12.0}
    assert cpu_ms_per_request(before, after, 100) == {"gateway": 5.0, "feature": 20.0}
    assert cpu_ms_per_request(before, after, 0) == {}


def test_query_texts_are_distinct() -> None:
    texts = [query_text(i) for i in range(200_000)]
    assert len(set(texts)) == len(texts)


def test_distinct_jpegs_decode_to_the_same_picture() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, format="JPEG")
    base = buffer.getvalue()
    a, b = distinct_jpeg(base, 1), distinct_jpeg(base, 2)
    assert a != b
    assert Image.open(io.BytesIO(a)).tobytes() == Image.open(io.BytesIO(base)).tobytes()


def test_requests_carry_token_and_length() -> None:
    work = Workload("127.0.0.1", 8000, "/search/text", "text", {"top_k": 3}, token="t0k")
    request = build_request(work, 5)
    head, body = request.split(b"\r\n\r\n", 1)
    assert b"Authorization: Bearer t0k" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert query_text(5).encode() in body


def _row(system: str, clients: int, requests: int, p99: float) -> Row:
    return Row("m", system, "text", "miss", clients, requests=requests, seconds=10.0, p99_ms=p99)


def test_headline_ratio_and_table() -> None:
    rows = [
        _row("services", 8, 90, 200.0),
        _row("baseline", 8, 100, 100.0),
        _row("services", 32, 70, 400.0),
        _row("baseline", 32, 100, 800.0),
    ]
    rows[0].statuses = {"200": 90, "503": 2}
    items = headline(rows)
    assert [(h["clients"], round(h["throughput_ratio"], 2)) for h in items] == [(8, 0.9), (32, 0.7)]
    assert [h["goal_met"] for h in items] == [True, False]
    assert items[0]["p99_ratio"] == 2.0
    table = render_table(rows)
    assert table.count("\n") == len(rows) + 1
    assert "503: 2" in table


def test_a_held_data_directory_is_waited_for_then_refused(tmp_path: Path) -> None:
    held = lock_data_directory(tmp_path)
    with pytest.raises(SystemExit, match="in use by another process"):
        wait_for_data_directory(tmp_path, timeout=0.2)
    # Released while the benchmark waits (an earlier run's service stopping): it goes on.
    threading.Timer(0.3, os.close, [held]).start()
    wait_for_data_directory(tmp_path, timeout=60)
    os.close(lock_data_directory(tmp_path))  # and nothing of the wait holds it
