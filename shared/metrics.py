"""Prometheus metrics shared by every service; ``shared.app.RequestMiddleware`` records them.

Names follow the tutorial's ``multimodal_*`` family so its dashboards and alert rules apply.
Requests are labelled by route template (``/items/{item_id}``), never by raw path, so label
cardinality stays bounded. Prometheus' scrapes and the orchestrator's probes (``QUIET_PATHS``) are
not traffic: they are never counted, so rates, latency percentiles and error ratios describe
what clients asked.

A service served by several worker processes (``GATEWAY_WORKERS``) runs prometheus_client in
its multiprocess mode: each worker writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR``,
and a scrape answered by any worker (or by the supervisor's metrics port) adds them up. Every
gauge such a service sets therefore names its ``multiprocess_mode``, and a gauge computed at
scrape time (``computed_gauge``) is written by each worker every few seconds instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Scope

REQUESTS = Counter(
    "multimodal_requests_total",
    "HTTP requests handled, by service, route template, method and status code.",
    ["service", "endpoint", "method", "status"],
)
ERRORS = Counter(
    "multimodal_errors_total",
    "HTTP requests answered with a 5xx or failed, by service, route template and error type.",
    ["service", "endpoint", "error_type"],
)
REQUEST_DURATION = Histogram(
    "multimodal_request_duration_seconds",
    "Time to answer an HTTP request, by service and route template.",
    ["service", "endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
UNMATCHED = "unmatched"


def route_template(scope: Scope) -> str:
    """The template of the route that answered (``/items/{item_id}``), ``unmatched`` for none."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED


def record_request(
    service: str,
    endpoint: str,
    method: str,
    status: int,
    seconds: float,
    error_type: str | None = None,
) -> None:
    """Count one request (not a probe or scrape; the caller leaves those out). ``error_type``
    names the exception that escaped, if any."""
    REQUESTS.labels(service, endpoint, method, str(status)).inc()
    REQUEST_DURATION.labels(service, endpoint).observe(seconds)
    # One count per failed request: by exception type when one escaped, else by status (the
    # 500 an escaped exception becomes is the same failure).
    if error_type is None and status >= 500:
        error_type = f"http_{status}"
    if error_type is not None:
        ERRORS.labels(service, endpoint, error_type).inc()


def start_error_series(service: str, routes: Iterable[BaseRoute]) -> None:
    """Create each route's ``http_500`` error series at 0, so an error ratio reads 0 in a
    healthy stack instead of having no data."""
    for route in routes:
        path = getattr(route, "path", None)
        if path and path not in QUIET_PATHS and isinstance(route, Route):
            ERRORS.labels(service, path, "http_500")


# -- several worker processes -----------------------------------------------------------------

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The pid of the process that started the workers (``shared.app.serve``): the process metrics
# of a scrape cover it and every process under it.
SUPERVISOR_PID_ENV = "CROSSMODAL_SUPERVISOR_PID"
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def multiprocess_dir() -> str | None:
    """Where the workers write their samples; None for a service in one process."""
    return os.environ.get(MULTIPROCESS_DIR_ENV) or None


def descendant_pids(pid: int) -> list[int]:
    """``pid``'s children, theirs and so on, from /proc (empty once ``pid`` is gone)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found.extend(children)
                pending.extend(children)
    return found


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


@dataclass(frozen=True)
class ProcessGroupUsage:
    cpu_seconds: float
    rss_bytes: int
    # When the group's first process started, in clock ticks after boot.
    started_ticks: int


def process_group_usage(pid: int) -> ProcessGroupUsage:
    """CPU and resident memory of ``pid`` and every process under it (a service's workers):
    utime + stime of each (/proc/<pid>/stat fields 14, 15) and ``pid``'s cutime + cstime (16, 17:
    its children that exited, so a replaced worker's time is kept); rss (24) of each. Raises
    ``OSError`` when ``pid`` is gone; a process under it that exits meanwhile is skipped."""
    fields = _stat(pid)
    cpu_ticks = sum(int(f) for f in fields[11:15])
    rss_pages = int(fields[21])
    for child in descendant_pids(pid):
        try:
            child_fields = _stat(child)
        except OSError:
            continue  # exited since it was listed
        cpu_ticks += int(child_fields[11]) + int(child_fields[12])
        rss_pages += int(child_fields[21])
    return ProcessGroupUsage(cpu_ticks / _TICK, rss_pages * _PAGE, int(fields[19]))


class WorkerGroupCollector:
    """What a scrape of a service in several processes shows: every worker's samples from the
    multiprocess directory, and the process metrics of the whole group (the supervisor and
    every process under it) under the names a single process exports, so dashboards read the
    same. CPU includes exited workers (the supervisor's reaped children's time), so the counter
    does not fall when a worker is replaced. Live gauges of workers that are gone are dropped
    first."""

    def __init__(self, directory: str, supervisor_pid: int) -> None:
        self._directory = directory
        self._supervisor = supervisor_pid
        self._files = MultiProcessCollector(None, path=directory)

    def _forget_gone_workers(self) -> None:
        for path in Path(self._directory).glob("gauge_live*_*.db"):
            pid = int(path.stem.rsplit("_", 1)[1])
            if not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(FileNotFoundError):
                    mark_process_dead(pid, self._directory)

    def _group(self) -> Iterator[Metric]:
        try:
            usage: ProcessGroupUsage | None = process_group_usage(self._supervisor)
        except OSError:
            usage = None  # the supervisor is gone
        yield CounterMetricFamily(
            "process_cpu_seconds_total",
            "User and system CPU time of the service's processes, in seconds.",
            value=usage.cpu_seconds if usage else 0.0,
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory of the service's processes, in bytes.",
            value=usage.rss_bytes if usage else 0,
        )
        if usage is not None:
            boot = next(
                float(line.split()[1])
                for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime ")
            )
            yield GaugeMetricFamily(
                "process_start_time_seconds",
                "Start time of the service's first process since the epoch, in seconds.",
                value=boot + usage.started_ticks / _TICK,
            )

    def collect(self) -> Iterator[Metric]:
        self._forget_gone_workers()
        yield from self._files.collect()
        yield from self._group()


def scrape_registry() -> CollectorRegistry:
    """What a scrape reads: this process's registry, or for a service in several worker
    processes every worker's samples and the group's process metrics."""
    directory = multiprocess_dir()
    if directory is None:
        return REGISTRY
    registry = CollectorRegistry(auto_describe=True)
    supervisor = int(os.environ.get(SUPERVISOR_PID_ENV) or os.getpid())
    registry.register(WorkerGroupCollector(directory, supervisor))
    return registry


async def metrics_endpoint(_: Request) -> Response:
    return Response(generate_latest(scrape_registry()), media_type=CONTENT_TYPE_LATEST)


# Gauges whose value is read from the process when scraped; in multiprocess mode a scrape
# reads files, so ``refresh_computed_gauges`` writes them instead.
_COMPUTED: dict[Gauge, Callable[[], float]] = {}
COMPUTED_REFRESH_SECONDS = 5.0


def computed_gauge(gauge: Gauge, read: Callable[[], float]) -> None:
    """``gauge`` shows ``read()``: computed at each scrape in a single process, written every
    ``COMPUTED_REFRESH_SECONDS`` by ``refresh_computed_gauges`` in a worker of several. The
    last call for a gauge wins (a new app instance replaces the old one's reader)."""
    if multiprocess_dir() is None:
        gauge.set_function(read)
    else:
        _COMPUTED[gauge] = read


async def refresh_computed_gauges(every: float = COMPUTED_REFRESH_SECONDS) -> None:
    """Write each computed gauge now and then, for as long as a worker of several runs (returns
    at once in a single process, where they are computed at scrape time)."""
    if multiprocess_dir() is None:
        return
    while True:
        for gauge, read in list(_COMPUTED.items()):
            gauge.set(read())
        await asyncio.sleep(every)
