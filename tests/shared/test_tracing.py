"""W3C Trace Context parsing (shared.tracing): the header cases the specification names."""

from __future__ import annotations

import re

import pytest

from shared.tracing import (
    MAX_TRACESTATE_CHARS,
    MAX_TRACESTATE_MEMBERS,
    NEW_TRACE_FLAGS,
    Span,
    outgoing_headers,
    parse_traceparent,
    parse_tracestate,
    span_var,
    start_span,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"


def test_the_specification_examples_parse() -> None:
    assert parse_traceparent(VALID) == (TRACE_ID, PARENT_ID, 0x01)
    assert parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-00") == (TRACE_ID, PARENT_ID, 0x00)
    # Optional whitespace around a header value is not part of it.
    assert parse_traceparent(f" {VALID}\t") == (TRACE_ID, PARENT_ID, 0x01)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00",
        VALID[:-1],  # too short
        VALID + "0",  # version 00 is exactly 55 characters
        VALID + "-extra",  # ... a 00 header takes no further fields
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # upper-case hex
        f"00-{TRACE_ID}-{PARENT_ID.upper()}-01",
        f"00-{TRACE_ID}-{PARENT_ID}-0G",  # flags not hex
        f"0g-{TRACE_ID}-{PARENT_ID}-01",  # version not hex
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is forbidden
        f"00_{TRACE_ID}-{PARENT_ID}-01",  # wrong delimiters
        f"00-{TRACE_ID}_{PARENT_ID}-01",
        f"00-{TRACE_ID}-{PARENT_ID}_01",
        f"00-{TRACE_ID[:-1]}x-{PARENT_ID}-01",
        f"00-{TRACE_ID[:31]}-{PARENT_ID}0-01",  # a field one short, the next one long
    ],
)
def test_invalid_headers_are_refused(value: str) -> None:
    assert parse_traceparent(value) is None


def test_a_future_version_is_read_as_far_as_version_00_goes() -> None:
    assert parse_traceparent(f"01-{TRACE_ID}-{PARENT_ID}-01") == (TRACE_ID, PARENT_ID, 0x01)
    assert parse_traceparent(f"cc-{TRACE_ID}-{PARENT_ID}-01-what-comes-next") == (
        TRACE_ID,
        PARENT_ID,
        0x01,
    )
    # The flags must end the value or be followed by a dash.
    assert parse_traceparent(f"cc-{TRACE_ID}-{PARENT_ID}-01x") is None
    assert parse_traceparent(f"cc-{TRACE_ID}-{PARENT_ID}-0") is None  # under 55 characters


def test_only_the_known_flags_are_kept() -> None:
    # sampled (01) and Level 2's random trace id (02); the others MUST be sent as zero.
    assert parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-ff") == (TRACE_ID, PARENT_ID, 0x03)
    assert parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-08") == (TRACE_ID, PARENT_ID, 0x00)
    span = start_span(f"00-{TRACE_ID}-{PARENT_ID}-09")
    assert span.traceparent.endswith("-01")
    assert span.sampled


def test_a_valid_parent_is_continued_with_a_new_span() -> None:
    first = start_span(VALID, "congo=t61rcWkgMzE")
    second = start_span(VALID, "congo=t61rcWkgMzE")
    assert first.trace_id == second.trace_id == TRACE_ID
    assert first.parent_id == second.parent_id == PARENT_ID
    assert re.fullmatch(r"[0-9a-f]{16}", first.span_id)
    assert first.span_id != second.span_id != PARENT_ID
    assert first.traceparent == f"00-{TRACE_ID}-{first.span_id}-01"
    assert first.tracestate == "congo=t61rcWkgMzE"


@pytest.mark.parametrize("header", [None, "", "garbage", f"ff-{TRACE_ID}-{PARENT_ID}-01"])
def test_without_a_valid_parent_a_new_trace_starts(header: str | None) -> None:
    span = start_span(header, "congo=t61rcWkgMzE")
    assert re.fullmatch(r"[0-9a-f]{32}", span.trace_id) and span.trace_id != TRACE_ID
    assert re.fullmatch(r"[0-9a-f]{16}", span.span_id)
    assert span.parent_id is None
    assert span.flags == NEW_TRACE_FLAGS
    # The caller's tracestate belongs to the trace that was not continued.
    assert span.tracestate is None
    assert start_span(header).trace_id != span.trace_id


def test_tracestate_members_pass_through_in_order() -> None:
    assert parse_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE") == (
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    )
    # Empty members and optional whitespace go; a value's leading spaces are its own.
    assert parse_tracestate(" ,rojo=1 ,\t, congo= x ,") == "rojo=1,congo= x"
    # Level 2 keys: a digit first, a tenant@system.
    assert parse_tracestate("1vendor=a,tenant@system=b") == "1vendor=a,tenant@system=b"
    assert parse_tracestate("") is None
    assert parse_tracestate(" , ") is None


@pytest.mark.parametrize(
    "value",
    [
        "rojo=1,rojo=2",  # one entry per key
        "Rojo=1",  # keys are lower case
        "rojo",  # no value
        "rojo=",  # an empty value
        "rojo=a,b",  # "b" is not a member
        "rojo=a=b",  # "=" is not a value character
        "rojo=a\tb",  # nor is a tab
        "_rojo=1",  # a key starts with a letter or digit
        "rojo=caf\u00e9",  # printable ASCII only
        f"{'k' * 257}=1",  # keys up to 256 characters
        f"rojo={'v' * 257}",  # values up to 256
    ],
)
def test_an_unparsable_tracestate_is_dropped_whole(value: str) -> None:
    assert parse_tracestate(value) is None


def test_tracestate_is_bounded_by_whole_entries() -> None:
    many = ",".join(f"k{i}=v" for i in range(40))
    kept = parse_tracestate(many)
    assert kept is not None
    assert kept.split(",") == [f"k{i}=v" for i in range(MAX_TRACESTATE_MEMBERS)]
    # Over 512 characters: entries over 128 characters go first, then from the right.
    long = f"long={'x' * 200}"
    entries = [f"k{i}={'v' * 61}" for i in range(10)]  # 64 characters each
    kept = parse_tracestate(",".join([entries[0], long, *entries[1:]]))
    assert kept is not None
    assert len(kept) <= MAX_TRACESTATE_CHARS
    assert kept.split(",") == entries[: len(kept.split(","))]
    assert len(kept.split(",")) == 7  # 7 * 64 + 6 commas fit in 512, 8 would not
    # Too large to be worth parsing.
    assert parse_tracestate(",".join(f"k{i}=v" for i in range(2000))) is None


def test_outgoing_headers_carry_the_current_span_as_parent() -> None:
    headers: dict[str, str] = {}
    outgoing_headers(headers)
    assert headers == {}  # outside a request: no trace to continue
    span = Span(TRACE_ID, "b7ad6b7169203331", parent_id=PARENT_ID, flags=1, tracestate="a=b")
    token = span_var.set(span)
    try:
        headers = {"traceparent": "00-stale-value"}
        outgoing_headers(headers)
    finally:
        span_var.reset(token)
    assert headers == {"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01", "tracestate": "a=b"}
