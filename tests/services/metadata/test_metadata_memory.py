"""The malloc arena cap the metadata service sets at start-up (services/metadata/memory.py)."""

from __future__ import annotations

import os
import platform

import pytest

from services.metadata.memory import limit_malloc_arenas
from services.metadata.settings import MetadataSettings


def test_two_arenas_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METADATA_MALLOC_ARENA_MAX", raising=False)
    assert MetadataSettings().malloc_arena_max == 2


def test_zero_keeps_glibc_default() -> None:
    assert limit_malloc_arenas(0) is False


def test_environment_variable_takes_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas(2) is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_sets_the_cap_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    # The arenas of this test process: a cap of 8 per core is glibc's own default on 64-bit.
    assert limit_malloc_arenas(8 * (os.cpu_count() or 1)) is True
