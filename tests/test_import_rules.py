"""Which project package may import which (issue 19, point 5), checked on the source with `ast`.

- a service (``services/<name>/``) imports no other service: services talk over HTTP, through the
  typed clients in ``shared/contracts/``;
- a service imports nothing from ``crossmodal/`` (the command-line tool and the model code);
- ``shared/`` imports no service and nothing from ``crossmodal/``;
- ``crossmodal/`` imports from ``services/`` only what ``CROSSMODAL_ALLOWED`` lists. Those are
  known exceptions, to be removed once the model code (``services/feature/model.py`` and its
  helpers) moves into a library of its own that both the feature service and ``crossmodal``
  import; the list may only shrink: an entry no file needs any more fails the test too.

Every import counts, function-level and ``TYPE_CHECKING`` ones included, relative ones resolved.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").is_file())

# crossmodal/ file -> the services modules it may import. Shrink only.
CROSSMODAL_ALLOWED: dict[str, set[str]] = {
    # The model code of the feature service: loading, pooling, devices, ONNX export names.
    "crossmodal/demo/emoji_model.py": {"services.feature.model"},
    "crossmodal/demo/train.py": {"services.feature.model"},
    "crossmodal/evaluate/models.py": {"services.feature.model"},
    "crossmodal/train/towers.py": {"services.feature.model"},
    "crossmodal/train/trainer.py": {"services.feature.model"},
    # Decoding an image the way the feature service does, for training and evaluation data.
    "crossmodal/data/images.py": {"services.feature.images"},
    # `crossmodal reconcile` drops the gateway's cached search pages of the collections it
    # repaired (the Redis key layout lives in services/gateway/cache.py).
    "crossmodal/cli.py": {"services.gateway.cache"},
    "crossmodal/reconcile.py": {"services.gateway.cache"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(path: Path) -> Iterator[str]:
    """The project modules ``path`` imports (``from m import x`` gives ``m.x`` where x is a
    module, else ``m``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                yield sub if is_module(sub) else module


@cache
def imports_by_file(package: str) -> dict[str, set[str]]:
    return {
        path.relative_to(ROOT).as_posix(): set(imports(path))
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_walk_sees_the_packages() -> None:
    # A walk that found nothing would pass every rule below.
    assert set(SERVICES) == {"auth", "feature", "gateway", "metadata", "retrieval"}
    for package in ("services", "shared", "crossmodal"):
        assert len(imports_by_file(package)) > 10, package
    assert "shared.contracts.feature" in imports_by_file("services")["services/gateway/app.py"]
    # the walk resolves a service's imports of its own modules
    assert any(
        under(m, "services.gateway") for m in imports_by_file("services")["services/gateway/app.py"]
    )


def test_services_do_not_import_each_other() -> None:
    bad = []
    for file, modules in imports_by_file("services").items():
        own = f"services.{file.split('/')[1]}" if file.count("/") > 1 else "services"
        for module in modules:
            other = [s for s in SERVICES if under(module, f"services.{s}")]
            if other and not under(module, own):
                bad.append(f"{file} imports {module}")
    assert not bad, "a service reaches another only over HTTP (shared/contracts/):\n" + "\n".join(
        sorted(bad)
    )


def test_services_do_not_import_crossmodal() -> None:
    bad = [
        f"{file} imports {module}"
        for file, modules in imports_by_file("services").items()
        for module in modules
        if under(module, "crossmodal")
    ]
    assert not bad, "\n".join(sorted(bad))


def test_shared_imports_no_service_and_no_crossmodal() -> None:
    bad = [
        f"{file} imports {module}"
        for file, modules in imports_by_file("shared").items()
        for module in modules
        if under(module, "services") or under(module, "crossmodal")
    ]
    assert not bad, "\n".join(sorted(bad))


def test_crossmodal_imports_only_the_allowed_services_modules() -> None:
    found = {
        file: {m for m in modules if under(m, "services")}
        for file, modules in imports_by_file("crossmodal").items()
    }
    found = {file: modules for file, modules in found.items() if modules}
    new = sorted(
        f"{file} imports {module}"
        for file, modules in found.items()
        for module in modules - CROSSMODAL_ALLOWED.get(file, set())
    )
    assert not new, "crossmodal/ imports services code outside CROSSMODAL_ALLOWED:\n" + "\n".join(
        new
    )
    stale = sorted(
        f"{file}: {module}"
        for file, modules in CROSSMODAL_ALLOWED.items()
        for module in modules - found.get(file, set())
    )
    assert not stale, "CROSSMODAL_ALLOWED lists imports no file makes any more; remove:\n" + (
        "\n".join(stale)
    )
