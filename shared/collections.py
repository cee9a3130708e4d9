"""The rule for collection names, which every service that stores or routes by collection uses:
lowercase letters, digits, '_' and '-', starting with a letter or digit, at most 64 characters.
It keeps names safe as folder names, Redis key parts and URL path segments."""

from __future__ import annotations

import re

COLLECTION_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_COLLECTION_NAME = re.compile(COLLECTION_NAME_PATTERN)


def is_collection_name(name: str) -> bool:
    return _COLLECTION_NAME.fullmatch(name) is not None
