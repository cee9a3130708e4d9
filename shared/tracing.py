"""W3C Trace Context (https://www.w3.org/TR/trace-context/; ``traceresponse`` from Level 2),
without a tracing SDK: the ids are what the logs and the headers need, and nothing is exported.

Each request a service handles is one span: it continues the caller's trace when ``traceparent``
is valid (a new span id, the caller's id as parent), else it starts a new trace. Calls to other
services (``shared.http``) send the current span as their parent, so the trace id and the parent
chain can be read back from the JSON logs of every service a request touched.
"""

from __future__ import annotations

import random
import re
from contextvars import ContextVar
from typing import Final

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
TRACERESPONSE: Final = "traceresponse"

SAMPLED: Final = 0x01
RANDOM_TRACE_ID: Final = 0x02  # Level 2: the trace id's right-most 7 bytes are random
# Flags this version defines; the others MUST be sent as zero.
_KNOWN_FLAGS = SAMPLED | RANDOM_TRACE_ID
# A trace started here has a random id, and every request is written to the log: recorded.
NEW_TRACE_FLAGS: Final = SAMPLED | RANDOM_TRACE_ID

# version, trace id, parent id, flags: lower-case hex only, as the spec asks.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16
_OWS = " \t"

# tracestate: at most 32 members; at least 512 characters are propagated, entries over 128
# characters dropped first when truncating. Longer headers are not even parsed.
MAX_TRACESTATE_MEMBERS: Final = 32
MAX_TRACESTATE_CHARS: Final = 512
_LONG_MEMBER = 128
_MAX_TRACESTATE_INPUT = 8192
# key "=" value, the Level 2 grammar (a superset of Level 1's simple and multi-tenant keys).
_MEMBER = re.compile(
    r"([a-z0-9][a-z0-9_\-*/@]{0,255})=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)


class Span:
    """The current service's part of a trace: one request it handles."""

    __slots__ = ("flags", "parent_id", "span_id", "trace_id", "traceparent", "tracestate")

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        *,
        parent_id: str | None = None,
        flags: int = NEW_TRACE_FLAGS,
        tracestate: str | None = None,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.flags = flags
        self.tracestate = tracestate
        # The traceparent of the calls this span makes and its traceresponse: the same value.
        self.traceparent = f"00-{trace_id}-{span_id}-{flags:02x}"

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def __repr__(self) -> str:
        return f"Span({self.traceparent!r}, parent_id={self.parent_id!r})"


# The span of the request being handled; None outside a request (startup, background tasks).
span_var: ContextVar[Span | None] = ContextVar("span", default=None)


def new_trace_id() -> str:
    # Not a secret: Mersenne Twister is random enough for the random-trace-id flag, and cheap.
    while (bits := random.getrandbits(128)) == 0:
        pass
    return f"{bits:032x}"


def new_span_id() -> str:
    while (bits := random.getrandbits(64)) == 0:
        pass
    return f"{bits:016x}"


def parse_traceparent(value: str) -> tuple[str, str, int] | None:
    """``(trace_id, parent_id, flags)`` of a valid header, flags limited to the known ones; None
    where the spec says to restart the trace. A version above 00 is read as far as 00 goes (its
    first fields, then the end or a dash); ``ff`` is never valid."""
    value = value.strip(_OWS)
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == "ff":
        return None
    if len(value) > 55 and (version == "00" or value[55] != "-"):
        return None
    if trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_SPAN_ID:
        return None
    return trace_id, parent_id, int(flags, 16) & _KNOWN_FLAGS


def parse_tracestate(value: str) -> str | None:
    """The header to pass on: its valid members in order, at most ``MAX_TRACESTATE_MEMBERS`` and
    ``MAX_TRACESTATE_CHARS`` (whole entries dropped, the long ones first, then from the right);
    None when it is empty, or cannot be parsed (a bad member, a key twice), or is too large to."""
    if len(value) > _MAX_TRACESTATE_INPUT:
        return None
    members: list[str] = []
    keys: set[str] = set()
    for part in value.split(","):
        member = part.strip(_OWS)
        if not member:  # empty members are allowed
            continue
        match = _MEMBER.fullmatch(member)
        if match is None or match[1] in keys:
            return None
        keys.add(match[1])
        members.append(member)
    del members[MAX_TRACESTATE_MEMBERS:]
    if len(",".join(members)) > MAX_TRACESTATE_CHARS:
        members = [m for m in members if len(m) <= _LONG_MEMBER]
        while len(",".join(members)) > MAX_TRACESTATE_CHARS:
            members.pop()
    return ",".join(members) or None


def start_span(traceparent: str | None = None, tracestate: str | None = None) -> Span:
    """The span of a request that arrived with these headers (each its fields combined, or None):
    the caller's trace continued when ``traceparent`` is valid, else a new trace (and
    ``tracestate`` dropped with the caller's trace)."""
    parent = parse_traceparent(traceparent) if traceparent else None
    if parent is None:
        return Span(new_trace_id(), new_span_id())
    trace_id, parent_id, flags = parent
    return Span(
        trace_id,
        new_span_id(),
        parent_id=parent_id,
        flags=flags,
        tracestate=parse_tracestate(tracestate) if tracestate else None,
    )


def outgoing_headers(headers: dict[str, str]) -> None:
    """Add the current span's ``traceparent`` and ``tracestate`` to the headers of a call to
    another service; outside a request there is no trace to continue, and nothing is added."""
    span = span_var.get()
    if span is None:
        return
    headers[TRACEPARENT] = span.traceparent
    if span.tracestate:
        headers[TRACESTATE] = span.tracestate
