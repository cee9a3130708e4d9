"""JSON that a client sends, taken only within bounds: in a form field (a filter, an item's
attributes) measured before it is parsed, and once parsed (there or in a JSON body) checked for
what no service can pass on.

``json.loads`` recurses once per level of nesting: a few kilobytes of ``[[[[…`` make it raise
``RecursionError``, which would surface as a 500. The text is therefore measured first (its
length, then its nesting, by a scan that skips string contents) and parsed only when both are
within the limits. A parsed value may still hold an unpaired surrogate (``"\\ud800"`` is valid
JSON), which no UTF-8 text can carry: encoding it for another service, a database or an error
message would fail, so it is refused here too. Each service turns ``JsonBoundsError`` (or the
message of ``json_problem``) into its own 422 problem.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

# Deeper than any valid filter (8 levels of $and/$or/$not make 19) or attribute object (1).
MAX_JSON_DEPTH: Final = 32

# A whole JSON string (escapes included) or one bracket: brackets inside strings do not nest.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
# json.loads joins a surrogate pair into one character: any surrogate left is unpaired.
_SURROGATE = re.compile("[\ud800-\udfff]")


class JsonBoundsError(ValueError):
    """The text is not JSON, or is longer or deeper than allowed; the message says which."""


def text_depth(text: str, limit: int = MAX_JSON_DEPTH) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (0 for a scalar), without
    parsing it; the scan stops a level past ``limit``. Unbalanced text is measured as far as it
    goes."""
    depth = deepest = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        first = match.group()[0]
        if first in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if depth > limit:
                break
        elif first in "]}":
            depth -= 1
    return deepest


def json_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why a parsed JSON value cannot be taken (nested deeper than ``max_depth``, or a key or
    string with an unpaired surrogate), as the end of a sentence; None if it can. Iterative: the
    walk stops at the first level past ``max_depth``."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return "holds an unpaired surrogate (\\ud800-\\udfff), which is not text"
            continue
        if isinstance(item, dict):
            children: list[Any] = [*item.keys(), *item.values()]
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth + 1 > max_depth:
            return f"nests at most {max_depth} levels of arrays and objects"
        pending.extend((child, depth + 1) for child in children)
    return None


def loads_bounded(text: str, *, what: str, max_chars: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)`` once ``text`` is at most ``max_chars`` long and ``max_depth`` deep,
    refused if the value holds an unpaired surrogate. ``what`` names the field in the messages."""
    if len(text) > max_chars:
        raise JsonBoundsError(f"{what} is at most {max_chars} characters of JSON")
    # Counting brackets is cheap; scanning for their nesting is needed only when there are many.
    many = text.count("[") + text.count("{") > max_depth
    if many and text_depth(text, max_depth) > max_depth:
        raise JsonBoundsError(f"{what} nests at most {max_depth} levels of arrays and objects")
    try:
        value = json.loads(text)
    # RecursionError too: the scan measures JSON, and text that is not JSON may mislead it.
    except (ValueError, RecursionError):
        raise JsonBoundsError(f"{what} is not valid JSON") from None
    problem = json_problem(value, max_depth)
    if problem:
        raise JsonBoundsError(f"{what} {problem}")
    return value
