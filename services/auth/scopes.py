"""The scopes of the platform (docs/architecture.md, "Scopes") and how a token's scope is chosen."""

from __future__ import annotations

from collections.abc import Iterable

from shared.contracts.auth import SCOPES as KNOWN_SCOPES

_ORDER = {scope: index for index, scope in enumerate(KNOWN_SCOPES)}


class ScopeError(ValueError):
    """A requested scope is unknown or not granted to the principal."""

    def __init__(self, scopes: Iterable[str]) -> None:
        self.scopes = tuple(sorted(scopes))
        super().__init__(" ".join(self.scopes))


def parse_scope(value: str | None) -> frozenset[str]:
    """An OAuth2 ``scope`` parameter (space-delimited, RFC 6749 §3.3) as a set."""
    return frozenset(value.split()) if value else frozenset()


def format_scopes(scopes: Iterable[str]) -> str:
    """Space-separated, in the documented order, so equal sets always give equal strings."""
    return " ".join(sorted(set(scopes), key=lambda s: (_ORDER.get(s, len(_ORDER)), s)))


def unknown_scopes(scopes: Iterable[str]) -> frozenset[str]:
    return frozenset(scopes) - _ORDER.keys()


def grant_scopes(requested: frozenset[str], granted: frozenset[str]) -> frozenset[str]:
    """The token's scopes: everything granted when nothing was requested, else the request itself,
    which must be a subset of what the principal holds (RFC 6749 §3.3 lets us refuse instead of
    silently narrowing, so a client never gets a token it did not expect)."""
    if not requested:
        return granted
    missing = requested - granted
    if missing:
        raise ScopeError(missing)
    return requested
