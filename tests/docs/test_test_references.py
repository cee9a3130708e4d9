"""Tests named by the docs exist: the threat model (docs/security.md) and other pages cite tests
as ``tests/<path>.py::<name>``, and a renamed or deleted test must not leave a claim behind."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def test_every_test_the_docs_cite_exists() -> None:
    cited: dict[tuple[str, str], list[str]] = {}
    for page in _pages():
        for match in REFERENCE.finditer(page.read_text(encoding="utf-8")):
            cited.setdefault((match[1], match[2]), []).append(page.relative_to(ROOT).as_posix())
    assert len(cited) >= 80  # the threat model alone cites more
    missing = [
        f"{file}::{name} (cited in {', '.join(sorted(set(pages)))})"
        for (file, name), pages in sorted(cited.items())
        if not (ROOT / file).is_file() or name not in _test_names(ROOT / file)
    ]
    assert not missing, "\n".join(missing)
