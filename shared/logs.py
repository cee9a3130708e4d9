"""JSON-lines logging: every line names the service, and inside a request its request id, trace id
and span id (``shared.context``, ``shared.tracing``), so one request can be followed through the
log of every service it touched."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from shared.context import request_id_var
from shared.tracing import span_var

# Structured fields of one line: ``log.info(msg, extra={FIELDS: {...}})``.
FIELDS = "fields"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``timestamp`` (UTC, milliseconds), ``level``, ``service``,
    ``logger``, ``msg``, then ``request_id``, ``trace_id`` and ``span_id`` inside a request, the
    record's structured fields and ``exc`` with a traceback."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        # The timestamp up to the second, remembered: strftime is a third of a line's cost.
        self._second = -1
        self._prefix = ""

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        span = span_var.get()
        if span is not None:
            entry["trace_id"] = span.trace_id
            entry["span_id"] = span.span_id
        fields = getattr(record, FIELDS, None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        # default=str: a field of another type is written as text rather than lost with the line.
        return orjson.dumps(entry, default=str).decode()


def configure_logging(service: str, level: str = "info") -> None:
    """JSON lines on stderr for the whole process, uvicorn's included (its access log stays off:
    the request middleware writes one line per request)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own handlers would print a second, unstructured copy of each line.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Python's warnings as log records (logger py.warnings), not bare text on stderr.
    logging.captureWarnings(True)
    # What the JSON lines never show, not collected for each record (the logging documentation's
    # "Optimization"): the caller's file and line, thread, process, process and task names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # Python 3.12 and later
