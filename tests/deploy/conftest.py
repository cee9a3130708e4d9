"""Fixtures for the deployment checks: the repository's compose file, Kubernetes manifests and
the stack table they must agree with (crossmodal/stack.py)."""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from crossmodal.stack import SERVICES, ServiceSpec

ROOT = Path(__file__).resolve().parents[2]

# How to get each external tool; CI installs them (see .ci/run), so there a missing one fails.
INSTALL_HINTS = {
    "promtool": "apt-get update && apt-get install -y --no-install-recommends prometheus",
    "kubernetes_validate": ".venv/bin/pip install kubernetes-validate",
}


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def stack() -> dict[str, ServiceSpec]:
    return {spec.name: spec for spec in SERVICES}


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def _missing(what: str) -> None:
    message = f"{what} is not available; install it with: {INSTALL_HINTS.get(what, what)}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (required when CI is set)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def require_tool() -> Callable[[str], str]:
    """``require_tool("promtool")`` returns its path; without it, fails under CI, else skips."""

    def require(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            _missing(name)
        return path

    return require


@pytest.fixture(scope="session")
def require_module() -> Callable[[str], Any]:
    """Like ``require_tool`` for a Python module."""

    def require(name: str) -> Any:
        try:
            return importlib.import_module(name)
        except ImportError:
            _missing(name)

    return require
