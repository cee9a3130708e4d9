"""A closed-loop HTTP load generator for search endpoints, cheap per request.

The same technique as ``benchmarks/feature.py``'s client (requests written as bytes on raw
keep-alive connections, as wrk or hey do, no HTTP library): on 2 cores every millisecond the load
generator spends is taken from the services it measures. It differs in what it sends: a search
request built per iteration (a distinct query each time for cache-miss phases, one repeated query
for cache-hit phases), with a bearer token, and it counts statuses and ``X-Cache`` answers.

It runs in its own process (``LoadProcess``): one spawned child kept for every phase, importing
nothing but the standard library, that reports its own CPU time for each phase. Everything here
is stdlib only for that reason.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

REQUEST_TIMEOUT_S = 120.0
_BOUNDARY = "e2ebench5f0c"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)
_X_CACHE = re.compile(rb"\r\nx-cache:\s*([A-Za-z-]+)", re.I)


# Query texts: four word slots give 12*16*39*20 = 149,760 distinct captions of CLIP-query length before a
# counter suffix is needed; the index of a request picks its words (mixed radix).
def _words(text: str) -> list[str]:
    return text.split()


_COLOURS = _words("red blue green yellow black white orange purple pink brown grey golden")
_SIZES = _words(
    "small large old new shiny broken wooden tiny huge striped painted plastic ancient modern "
    "dusty wet"
)
_THINGS = _words(
    "dog cat bicycle car teapot guitar umbrella chair lamp boat pizza apple clock kite horse "
    "train bird shoe hat book cup tree house flower fish bus camera phone robot balloon "
    "candle bottle key drum piano rocket tent bridge cake"
)
_PLACES = [
    "on a table", "in the snow", "next to a window", "on a white background", "at the beach",
    "in a forest", "on a city street", "under the rain", "in a kitchen", "at night",
    "in a garden", "on a shelf", "in the desert", "by a lake", "in a studio", "on the grass",
    "in a museum", "on a rooftop", "in the fog", "at sunset",
]  # fmt: skip


def query_text(index: int) -> str:
    """The ``index``-th distinct query text (a short caption; distinct for every index)."""
    parts = []
    rest = index
    for words in (_COLOURS, _SIZES, _THINGS, _PLACES):
        parts.append(words[rest % len(words)])
        rest //= len(words)
    text = f"a photo of a {parts[1]} {parts[0]} {parts[2]} {parts[3]}"
    return f"{text} {rest}" if rest else text


def distinct_jpeg(base: bytes, index: int) -> bytes:
    """``base`` (a JPEG) with a comment segment naming ``index``: other bytes (another cache key,
    another SHA-256) for the same picture, made in microseconds instead of a re-encode."""
    if base[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    comment = f"e2e-bench {index}".encode()
    return base[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + base[2:]


@dataclass(frozen=True)
class Workload:
    """What a phase sends (picklable: it crosses into the load process).

    ``kind`` "text": JSON to ``path``; "image": multipart with the picture in ``image``.
    ``distinct``: every request another query, numbered from ``first_index``; otherwise the query
    numbered ``first_index`` every time (the cache-hit case)."""

    host: str
    port: int
    path: str
    kind: str
    fields: dict[str, Any]
    token: str | None = None
    image: bytes | None = None
    distinct: bool = True
    first_index: int = 0


def build_request(work: Workload, index: int) -> bytes:
    """The complete HTTP/1.1 request for query number ``index``."""
    if work.kind == "text":
        body = json.dumps({"query": query_text(index), **work.fields}).encode()
        content_type = "application/json"
    else:
        assert work.image is not None
        blob = distinct_jpeg(work.image, index)
        parts = [
            f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="q{index}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
            + blob
            + b"\r\n"
        ]
        for name, value in work.fields.items():
            parts.append(
                f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                f"{value}\r\n".encode()
            )
        body = b"".join(parts) + f"--{_BOUNDARY}--\r\n".encode()
        content_type = f"multipart/form-data; boundary={_BOUNDARY}"
    auth = f"Authorization: Bearer {work.token}\r\n" if work.token else ""
    head = (
        f"POST {work.path} HTTP/1.1\r\nHost: {work.host}:{work.port}\r\n{auth}"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class PhaseResult:
    """What one phase of load measured. ``latencies``: seconds, of 200 answers only."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    x_cache: dict[str, int] = field(default_factory=dict)
    issued: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def answered(self) -> int:
        return sum(n for status, n in self.statuses.items() if status.isdigit())


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes]:
    """Send one request on a keep-alive connection, read the whole answer: (status, head)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    match = _CONTENT_LENGTH.search(head)
    if match is None:
        raise RuntimeError("an answer without Content-Length")
    await reader.readexactly(int(match.group(1)))
    return int(head[9:12]), head


async def run_phase(work: Workload, clients: int, seconds: float) -> PhaseResult:
    """Closed loop: ``clients`` coroutines, each on its own keep-alive connection, sending its
    next request as soon as the previous one is answered, for ``seconds``. Requests in flight
    at the end are awaited and counted; the phase lasts until the last answer."""
    result = PhaseResult()
    statuses: Counter[str] = Counter()
    caches: Counter[str] = Counter()
    next_index = work.first_index

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection(work.host, work.port), REQUEST_TIMEOUT_S
        )

    async def worker(deadline: float) -> None:
        nonlocal next_index
        reader, writer = await connect()
        try:
            while time.perf_counter() < deadline:
                index = next_index
                if work.distinct:
                    next_index += 1
                request = build_request(work, index)
                result.issued += 1
                t0 = time.perf_counter()
                try:
                    status, head = await asyncio.wait_for(
                        _exchange(reader, writer, request), REQUEST_TIMEOUT_S
                    )
                except (OSError, asyncio.IncompleteReadError, TimeoutError, RuntimeError) as exc:
                    # A dropped connection is an error, then a new connection.
                    statuses[type(exc).__name__] += 1
                    writer.close()
                    reader, writer = await connect()
                    continue
                statuses[str(status)] += 1
                cache = _X_CACHE.search(head)
                caches[cache.group(1).decode().lower() if cache else "none"] += 1
                if status == 200:
                    result.latencies.append(time.perf_counter() - t0)
        finally:
            writer.close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(t0 + seconds) for _ in range(clients)))
    result.seconds = time.perf_counter() - t0
    result.cpu_seconds = time.process_time() - cpu0
    result.statuses, result.x_cache = dict(statuses), dict(caches)
    return result


def _phase_in_child(work: Workload, clients: int, seconds: float) -> PhaseResult:
    return asyncio.run(run_phase(work, clients, seconds))


class LoadProcess:
    """One spawned child process that runs every phase, so the load generator's CPU is its own
    (measured in the child, the phase only: no start-up or import in it)."""

    def __init__(self) -> None:
        self._pool = get_context("spawn").Pool(1)

    def run(self, work: Workload, clients: int, seconds: float) -> PhaseResult:
        return self._pool.apply(_phase_in_child, (work, clients, seconds))

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def __enter__(self) -> LoadProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
