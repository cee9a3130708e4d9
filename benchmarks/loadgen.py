"""A closed-loop HTTP load generator for search endpoints, cheap per request.

The same technique as ``benchmarks/feature.py``'s client (requests written as bytes on raw
keep-alive connections, as wrk or hey do, no HTTP library): on 2 cores every millisecond the load
generator spends is taken from the services it measures. It differs in what it sends: a search
request built per iteration (a distinct query each time for cache-miss phases, one repeated query
for cache-hit phases), with a bearer token, and it counts statuses and ``X-Cache`` answers.

For the soak (benchmarks/soak.py) it also sends a weighted mix (``run_mix``: text and image
searches with the cache missing and hitting, and ingests that keep a window of items) paced at a
target rate, or flat out from a closed loop to measure capacity, with latencies and statuses per
kind and per interval of the run.

It runs in its own process (``LoadProcess``): one spawned child kept for every phase, importing
nothing but the standard library, that reports its own CPU time for each phase. Everything here
is stdlib only for that reason.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.parse
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.pool import AsyncResult
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
) -> tuple[int, bytes, bytes]:
    """Send one request on a keep-alive connection, read the whole answer: (status, head,
    body)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = _CONTENT_LENGTH.search(head)
    if match is None:
        if status == 204 or status == 304 or status < 200:  # no body by definition
            return status, head, b""
        raise RuntimeError("an answer without Content-Length")
    body = await reader.readexactly(int(match.group(1)))
    return status, head, body


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
                    status, head, _ = await asyncio.wait_for(
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


# --- a mixed workload at a target rate (the soak, benchmarks/soak.py) --------------------------

MIX_KINDS = ("text-miss", "text-hit", "image-miss", "image-hit", "ingest")
# "delete" is not scheduled: an ingest that overflows the window deletes the oldest soak item.
RESULT_KINDS = (*MIX_KINDS, "delete")
DEFAULT_MIX = {"text-miss": 40, "text-hit": 20, "image-miss": 15, "image-hit": 15, "ingest": 10}
SUCCESS = {"ingest": "201", "delete": "204"}  # every other kind answers 200
LATE_S = 0.1  # a paced request sent this long after its slot counts as late


def parse_mix(text: str) -> dict[str, int]:
    """``"text-miss=40,ingest=10"`` as weights; unknown kinds and non-positive weights refused."""
    weights: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, weight = part.partition("=")
        kind = kind.strip()
        if kind not in MIX_KINDS:
            raise ValueError(f"unknown kind {kind!r}: {', '.join(MIX_KINDS)}")
        if not weight.strip().isdigit() or int(weight) <= 0:
            raise ValueError(f"{kind}: the weight must be a positive integer, not {weight!r}")
        weights[kind] = int(weight)
    if not weights:
        raise ValueError("an empty mix")
    return weights


def mix_order(weights: dict[str, int]) -> list[str]:
    """One cycle of the kinds, each as often as its weight, spread out (smooth weighted round
    robin, as nginx balances): slot ``i`` of a run takes ``order[i % len(order)]``, so any
    stretch of the run, short or long, carries the mix in proportion."""
    current = dict.fromkeys(weights, 0)
    total = sum(weights.values())
    order = []
    for _ in range(total):
        for kind, weight in weights.items():
            current[kind] += weight
        kind = max(current, key=lambda k: current[k])  # ties: the first in the mix
        current[kind] -= total
        order.append(kind)
    return order


def slot_time(slot: int, rate: float) -> float:
    """When slot ``slot`` is due, in seconds from the start, at ``rate`` slots a second: an open
    schedule, not one answer after another, so a slow answer does not slow the offered load."""
    return slot / rate


class IngestWindow:
    """The soak items kept in the collection, oldest first: once more than ``size`` are there,
    the oldest go, so the collection's size (and the memory it takes) stays constant and memory
    growth measures leaks, not data."""

    def __init__(self, size: int, items: tuple[int, ...] = ()) -> None:
        self.size = size
        self.items: deque[int] = deque(items)

    def added(self, item_id: int) -> list[int]:
        """Record a new item; the ids to delete now."""
        self.items.append(item_id)
        return [self.items.popleft() for _ in range(max(0, len(self.items) - self.size))]

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class KindStats:
    """One kind of request in one interval. ``latencies``: seconds, of successful answers."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    x_cache: dict[str, int] = field(default_factory=dict)

    def add(self, other: KindStats) -> None:
        self.latencies += other.latencies
        for mine, theirs in ((self.statuses, other.statuses), (self.x_cache, other.x_cache)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n


@dataclass(frozen=True)
class MixWorkload:
    """What a mixed run sends (picklable: it crosses into the load process).

    Searches go to ``collection`` (target=image); ingests add a distinct ``ingest_image`` with a
    caption to ``ingest_collection`` and delete the oldest soak item past ``window`` items
    (``window_items``: those an earlier run left, oldest first). Distinct queries are numbered
    from ``first_index`` (> 0: number 0 is the repeated "hit" query). With ``login`` (user,
    password) the token is renewed every ``renew_s`` (an access token lasts 15 minutes)."""

    host: str
    port: int
    token: str
    collection: str
    ingest_collection: str
    image: bytes
    ingest_image: bytes
    weights: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MIX))
    top_k: int = 10
    window: int = 200
    window_items: tuple[int, ...] = ()
    first_index: int = 1
    interval_s: float = 10.0
    login: tuple[str, str] | None = None
    renew_s: float = 600.0


@dataclass
class MixResult:
    """What a mixed run measured. ``intervals[n]``: the requests whose slot fell in the n-th
    ``interval_s`` of the run, by kind. ``started_at``: the run's start, epoch seconds (to line
    up samples taken outside the load process)."""

    interval_s: float
    intervals: list[dict[str, KindStats]] = field(default_factory=list)
    started_at: float = 0.0
    seconds: float = 0.0
    slots: int = 0
    late: int = 0
    cpu_seconds: float = 0.0
    window_items: tuple[int, ...] = ()
    renewals: dict[str, int] = field(default_factory=dict)

    def totals(self, first: int = 0, end: int | None = None) -> dict[str, KindStats]:
        """Every kind over intervals ``first`` to ``end`` (exclusive; None: to the last)."""
        out: dict[str, KindStats] = {}
        for interval in self.intervals[first:end]:
            for kind, stats in interval.items():
                out.setdefault(kind, KindStats()).add(stats)
        return out


def _multipart(fields: dict[str, Any], blob: bytes, filename: str) -> tuple[bytes, str]:
    parts = [
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="image"; '
        f'filename="{filename}"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
        + blob
        + b"\r\n"
    ]
    for name, value in fields.items():
        parts.append(
            f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
        )
    body = b"".join(parts) + f"--{_BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={_BOUNDARY}"


def build_mix_request(work: MixWorkload, token: str, kind: str, index: int) -> bytes:
    """The request of one slot: ``kind`` with query (or ingest image) number ``index``."""
    if kind == "ingest":
        fields = {"collection": work.ingest_collection, "caption": f"soak item {index}"}
        blob = distinct_jpeg(work.ingest_image, index)
        body, content_type = _multipart(fields, blob, f"soak{index}.jpg")
        path = "/items"
    else:
        number = 0 if kind.endswith("-hit") else index
        search = {"top_k": work.top_k, "target": "image", "collection": work.collection}
        if kind.startswith("text"):
            body = json.dumps({"query": query_text(number), **search}).encode()
            content_type = "application/json"
        else:
            blob = distinct_jpeg(work.image, number)
            body, content_type = _multipart(search, blob, f"q{number}.jpg")
        path = f"/search/{kind.split('-')[0]}"
    return (
        f"POST {path} HTTP/1.1\r\nHost: {work.host}:{work.port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def build_delete(work: MixWorkload, token: str, item_id: int) -> bytes:
    return (
        f"DELETE /items/{item_id} HTTP/1.1\r\nHost: {work.host}:{work.port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _password_token(host: str, port: int, user: str, password: str) -> str:
    """A fresh access token (password grant), with the standard library's blocking client."""
    form = urllib.parse.urlencode(
        {"grant_type": "password", "username": user, "password": password}
    ).encode()
    url = f"http://{host}:{port}/auth/token"
    with urllib.request.urlopen(url, data=form, timeout=30) as answer:
        return str(json.load(answer)["access_token"])


async def run_mix(work: MixWorkload, seconds: float, rate: float | None, clients: int) -> MixResult:
    """The mix for ``seconds``. With ``rate`` (slots a second): paced, slot ``i`` sent at
    ``slot_time(i, rate)`` by the first of ``clients`` connections free, its latency counted
    from that time (a late send is waiting the user would see, not hidden). Without: a closed
    loop of ``clients``, flat out (capacity). An ingest slot that overflows the window also
    deletes the oldest soak item (kind "delete", on the same connection). Requests in flight at
    the end are awaited."""
    order = mix_order(work.weights)
    result = MixResult(interval_s=work.interval_s)
    window = IngestWindow(work.window, work.window_items)
    token = work.token
    next_slot = 0

    def stats(slot_offset: float, kind: str) -> KindStats:
        n = max(0, int(slot_offset // work.interval_s))
        while len(result.intervals) <= n:
            result.intervals.append({})
        return result.intervals[n].setdefault(kind, KindStats())

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection(work.host, work.port), REQUEST_TIMEOUT_S
        )

    async def send(
        conn: list[Any], request: bytes, kind: str, at: float, since: float
    ) -> tuple[int, bytes]:
        """One exchange, recorded under ``kind`` in the interval of the slot due at ``at``,
        its latency counted from ``since``; (status, body), status 0 for a transport error
        (then a new connection)."""
        record = stats(at - t0, kind)
        try:
            status, head, body = await asyncio.wait_for(
                _exchange(conn[0], conn[1], request), REQUEST_TIMEOUT_S
            )
        except (OSError, asyncio.IncompleteReadError, TimeoutError, RuntimeError) as exc:
            record.statuses[type(exc).__name__] = record.statuses.get(type(exc).__name__, 0) + 1
            conn[1].close()
            conn[:] = await connect()
            return 0, b""
        code = str(status)
        record.statuses[code] = record.statuses.get(code, 0) + 1
        cache = _X_CACHE.search(head)
        label = cache.group(1).decode().lower() if cache else "none"
        record.x_cache[label] = record.x_cache.get(label, 0) + 1
        if code == SUCCESS.get(kind, "200"):
            record.latencies.append(time.perf_counter() - since)
        return status, body

    async def worker(deadline: float) -> None:
        nonlocal next_slot
        conn: list[Any] = list(await connect())
        try:
            while True:
                # The slot is taken before any wait: no two connections send the same one.
                slot = next_slot
                at = time.perf_counter() if rate is None else t0 + slot_time(slot, rate)
                if at >= deadline:
                    return
                next_slot += 1
                if rate is not None:
                    delay = at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    elif -delay > LATE_S:
                        result.late += 1
                kind = order[slot % len(order)]
                index = work.first_index + slot
                status, body = await send(
                    conn, build_mix_request(work, token, kind, index), kind, at, at
                )
                if kind == "ingest" and status == 201:
                    for old in window.added(int(json.loads(body)["id"])):
                        request = build_delete(work, token, old)
                        await send(conn, request, "delete", at, time.perf_counter())
        finally:
            conn[1].close()

    async def renew(deadline: float) -> None:
        nonlocal token
        assert work.login is not None
        while time.perf_counter() + work.renew_s < deadline:
            await asyncio.sleep(work.renew_s)
            try:
                token = await asyncio.to_thread(_password_token, work.host, work.port, *work.login)
                outcome = "renewed"
            except (OSError, ValueError, KeyError) as exc:
                outcome = type(exc).__name__  # the old token goes on until it expires
            result.renewals[outcome] = result.renewals.get(outcome, 0) + 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    result.started_at = time.time()
    deadline = t0 + seconds
    renewer = asyncio.create_task(renew(deadline)) if work.login else None
    await asyncio.gather(*(worker(deadline) for _ in range(clients)))
    if renewer is not None:
        renewer.cancel()
    result.seconds = time.perf_counter() - t0
    result.cpu_seconds = time.process_time() - cpu0
    result.slots = next_slot
    result.window_items = tuple(window.items)
    return result


def _mix_in_child(work: MixWorkload, seconds: float, rate: float | None, clients: int) -> MixResult:
    return asyncio.run(run_mix(work, seconds, rate, clients))


def _phase_in_child(work: Workload, clients: int, seconds: float) -> PhaseResult:
    return asyncio.run(run_phase(work, clients, seconds))


class LoadProcess:
    """One spawned child process that runs every phase, so the load generator's CPU is its own
    (measured in the child, the phase only: no start-up or import in it)."""

    def __init__(self) -> None:
        self._pool = get_context("spawn").Pool(1)

    def run(self, work: Workload, clients: int, seconds: float) -> PhaseResult:
        return self._pool.apply(_phase_in_child, (work, clients, seconds))

    def submit_mix(
        self, work: MixWorkload, seconds: float, rate: float | None, clients: int
    ) -> AsyncResult[MixResult]:
        """Start a mixed run (``run_mix``) and return at once: the caller samples the services
        while it runs, then takes the result with ``.get()``."""
        return self._pool.apply_async(_mix_in_child, (work, seconds, rate, clients))

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def __enter__(self) -> LoadProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
