"""Each image installs the core dependencies and its service's extra only (pyproject.toml,
services/<name>/Dockerfile). These tests hold the code to that split: a static walk of every
import the image's modules can run, function-level ones included, and an import of each service
in a subprocess where everything outside its extra cannot be imported.

The same holds for the `crossmodal` command's extras: `cli` for its client commands, `demo` for
the demo, training and evaluation code.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from crossmodal.stack import SERVICES

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("shared", "services", "crossmodal")
NAMES = [spec.name for spec in SERVICES]

# The model libraries: only the feature service (torch, transformers, ONNX) and the retrieval
# service (Faiss) may reach them, since each weighs hundreds of MB in an image.
MODEL_IMPORTS = {"torch", "torchvision", "transformers", "onnx", "onnxruntime", "faiss"}
MODEL_DISTRIBUTIONS = {"torch", "torchvision", "transformers", "onnx", "onnxruntime", "faiss-cpu"}
ALLOWED_MODEL_IMPORTS = {"feature": MODEL_IMPORTS - {"faiss"}, "retrieval": {"faiss"}}

# Imports the walk finds that are not needed: each is used only when it imports.
OPTIONAL = {
    # DeviceJpegDecoder: GPU decoding, used only where DeviceJpegDecoder.available() imports it.
    ("services.feature.preprocess", "torchvision"),
}

# Extra dependencies no `import` names: each is loaded by another library.
LOADED_BY_OTHERS = {
    "python-multipart": "FastAPI, for the form and file routes",
    "psycopg": "SQLAlchemy, for postgresql+psycopg:// database URLs",
}


def normalize(name: str) -> str:
    """PEP 503 names: `PyJWT` and `pyjwt`, `faiss_cpu` and `faiss-cpu` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --- the static walk ------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    module: str  # as written, made absolute
    where: str  # module:line


@dataclass(frozen=True)
class Target:
    """What one installation runs: its root modules, the extras it installs, and project
    packages whose imports belong to other extras (commands of a CLI that need more)."""

    name: str
    extras: tuple[str, ...]
    roots: tuple[str, ...]
    elsewhere: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.name


def module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def modules_under(package: str) -> list[str]:
    """Every module of a project package, by path (alembic loads migrations that way)."""
    base = ROOT.joinpath(*package.split("."))
    names = []
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    """Every import a module can run: at module level, in functions and in classes. Only the
    `if TYPE_CHECKING:` blocks are left out (they never run)."""
    path = module_file(module)
    assert path is not None, module
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: list[Import] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, f"{module}:{node.lineno}") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            where = f"{module}:{node.lineno}"
            found.append(Import(source, where))
            # `from shared import images` imports the module shared.images.
            if source.split(".")[0] in PROJECT_PACKAGES:
                for alias in node.names:
                    if module_file(f"{source}.{alias.name}"):
                        found.append(Import(f"{source}.{alias.name}", where))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return tuple(found)


def _parents(module: str) -> Iterator[str]:
    parts = module.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


def third_party_imports(target: Target) -> dict[str, list[str]]:
    """Top-level names of the non-project, non-stdlib modules the target's code imports, with
    where: the walk follows every project module reached from the roots."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    found: dict[str, list[str]] = {}
    seen: set[str] = set()
    todo = list(target.roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(parent for parent in _parents(module) if module_file(parent))
        for item in imports_of(module):
            top = item.module.split(".")[0]
            if top in PROJECT_PACKAGES:
                reached = item.module
                while reached and not module_file(reached):  # `import a.b.name`: a.b
                    reached = reached.rpartition(".")[0]
                assert reached, f"{item.where}: {item.module} is not in the project"
                if not any(reached == p or reached.startswith(f"{p}.") for p in target.elsewhere):
                    todo.append(reached)
            elif top not in stdlib and (module, top) not in OPTIONAL:
                found.setdefault(top, []).append(item.where)
    return found


# --- what an extra installs -----------------------------------------------------------------


@cache
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def declared(extras: Iterable[str]) -> list[Requirement]:
    """The core dependencies and those of the extras, an extra naming others (demo, all)
    expanded."""
    own = normalize(project()["name"])
    lines = list(project()["dependencies"])
    pending, done = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in done:
            continue
        done.add(extra)
        for line in project()["optional-dependencies"][extra]:
            requirement = Requirement(line)
            if normalize(requirement.name) == own:
                pending.extend(requirement.extras)
            else:
                lines.append(line)
    return [Requirement(line) for line in lines]


def installed_with(extras: Iterable[str]) -> set[str]:
    """The distributions pip installs for core + extras: the declared ones and, from the
    installed metadata, their dependencies with the extras asked of them (uvicorn[standard])."""
    result: set[str] = set()
    pending = [(normalize(r.name), frozenset(r.extras)) for r in declared(extras)]
    done: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, wanted = pending.pop()
        if (name, wanted) in done:
            continue
        done.add((name, wanted))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # not for this platform or Python (its marker said so)
        result.add(name)
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in ("", *wanted)
            ):
                pending.append((normalize(requirement.name), frozenset(requirement.extras)))
    return result


@cache
def distributions_of() -> dict[str, set[str]]:
    """Top-level import name -> the installed distributions that provide it."""
    return {
        name: {normalize(dist) for dist in dists}
        for name, dists in metadata.packages_distributions().items()
    }


def blocked_imports(extras: Iterable[str]) -> set[str]:
    """The top-level names an image with core + extras lacks: every installed one that no
    distribution in it provides."""
    allowed = installed_with(extras)
    return {
        name
        for name, dists in distributions_of().items()
        if not dists & allowed and name not in PROJECT_PACKAGES and name.isidentifier()
    }


SERVICE_TARGETS = [
    Target(name, (name,), tuple(modules_under(f"services.{name}"))) for name in NAMES
]
# login, index, search, collections, reconcile; run, train and evaluate import the demo code in
# their functions, and need the demo extra (run: all).
CLI_TARGET = Target(
    "cli",
    ("cli",),
    ("crossmodal.cli",),
    elsewhere=("crossmodal.demo", "crossmodal.train", "crossmodal.evaluate"),
)
DEMO_TARGET = Target(
    "demo",
    ("demo",),
    tuple(
        module
        for package in ("crossmodal.demo", "crossmodal.train", "crossmodal.evaluate")
        for module in modules_under(package)
    ),
)


# --- the tests ------------------------------------------------------------------------------


def test_every_service_has_an_extra_and_all_has_every_extra() -> None:
    extras = project()["optional-dependencies"]
    assert set(NAMES) <= extras.keys()
    (everything,) = extras["all"]
    assert set(Requirement(everything).extras) == extras.keys() - {"all", "dev"}


@pytest.mark.parametrize("target", [*SERVICE_TARGETS, CLI_TARGET, DEMO_TARGET], ids=str)
def test_import_graph_needs_only_core_and_its_extra(target: Target) -> None:
    allowed = installed_with(target.extras)
    outside = {
        name: where
        for name, where in third_party_imports(target).items()
        if not distributions_of().get(name, set()) & allowed
    }
    assert not outside, (
        f"{target} imports what core + {'/'.join(target.extras)} does not install "
        f"(add it to the extra in pyproject.toml, or move the import): "
        + "; ".join(
            f"{name} ({'/'.join(sorted(distributions_of().get(name, {'not installed'})))}) "
            f"at {', '.join(where[:3])}"
            for name, where in sorted(outside.items())
        )
    )


@pytest.mark.parametrize("target", SERVICE_TARGETS, ids=str)
def test_model_libraries_only_where_they_are_used(target: Target) -> None:
    # No torch, transformers or ONNX outside the feature image, no Faiss outside retrieval's:
    # neither imported by the code nor pulled in by the extra's dependencies.
    allowed = ALLOWED_MODEL_IMPORTS.get(target.name, set())
    reached = {
        name: where
        for name, where in third_party_imports(target).items()
        if name in MODEL_IMPORTS - allowed
    }
    assert not reached, f"{target} imports model libraries: {reached}"
    dists_allowed = {d for name in allowed for d in distributions_of().get(name, set())}
    pulled = installed_with(target.extras) & (MODEL_DISTRIBUTIONS - dists_allowed)
    assert not pulled, f"core + {target.name} installs {sorted(pulled)}"


@pytest.mark.parametrize("target", [*SERVICE_TARGETS, CLI_TARGET], ids=str)
def test_every_dependency_of_an_extra_is_used(target: Target) -> None:
    # An extra stays what its service needs: each of its distributions is imported by the code
    # (or loaded by a library it uses, LOADED_BY_OTHERS). The demo extra is the feature extra
    # plus the demo's own, so it is not held to this.
    imported = {
        dist for name in third_party_imports(target) for dist in distributions_of().get(name, ())
    }
    (extra,) = target.extras
    unused = [
        requirement.name
        for requirement in map(Requirement, project()["optional-dependencies"][extra])
        if normalize(requirement.name) not in imported | set(LOADED_BY_OTHERS)
    ]
    assert not unused, f"the {extra} extra installs what its code never imports: {unused}"


def test_every_core_dependency_is_used_by_every_service() -> None:
    # The core is what every service needs; a library only some services use goes to their
    # extras. cryptography is PyJWT's RS256 backend (every service verifies tokens), declared
    # for its version floor; auth also imports it.
    walks = {target.name: set(third_party_imports(target)) for target in SERVICE_TARGETS}
    for line in project()["dependencies"]:
        name = normalize(Requirement(line).name)
        if name == "cryptography":
            continue
        for service, names in walks.items():
            provided = {d for n in names for d in distributions_of().get(n, ())}
            assert name in provided, f"core dependency {name} is not imported by {service}"


# Runs in a fresh interpreter: every finder on sys.meta_path is wrapped so that the blocked
# top-level names are found nowhere, as in the image (importlib.util.find_spec answers None, so
# libraries probing for optional packages see them missing); then the modules are imported, and
# none of the blocked names may have been loaded.
_IMPORT_CHECK = """
import importlib, json, sys
blocked = frozenset(json.loads(sys.argv[1]))
before = set(sys.modules)

class Hiding:
    def __init__(self, finder):
        self._finder = finder

    def __getattr__(self, name):
        return getattr(self._finder, name)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            return None
        return self._finder.find_spec(name, path, target)

sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]
for module in sys.argv[2:]:
    importlib.import_module(module)
loaded = sorted({m.partition(".")[0] for m in set(sys.modules) - before} & blocked)
assert not loaded, loaded
"""


@pytest.mark.parametrize(
    ("target", "modules"),
    [
        *[(t, (f"services.{t.name}.__main__", f"services.{t.name}.app")) for t in SERVICE_TARGETS],
        (CLI_TARGET, ("crossmodal.cli",)),
    ],
    ids=[*NAMES, "cli"],
)
def test_imports_with_only_core_and_its_extra(target: Target, modules: tuple[str, ...]) -> None:
    blocked = blocked_imports(target.extras)
    # The check is only as good as its list: the installed model libraries must be on it.
    models = MODEL_IMPORTS - ALLOWED_MODEL_IMPORTS.get(target.name, set())
    assert models & distributions_of().keys() <= blocked
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK, json.dumps(sorted(blocked)), *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
