"""constraints.txt, the lock: its form, what it covers, and that the Makefile and the venv use it.

The Dockerfiles' side is in test_dockerfiles.py (every `pip install` there takes `-c
constraints.txt`).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import Specifier

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "constraints.txt"
# name==version and nothing else: no ranges, markers, URLs or local labels (+cpu), which would not
# match the same torch build on the PyTorch index and on PyPI.
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.!]+)$")


def normalize(name: str) -> str:
    """PEP 503: `PyYAML`, `typing_extensions` and `typing-extensions` name one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> dict[str, str]:
    """The pins of a constraints file, by normalised name; raises on a line that is not a pin."""
    pins: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"constraints.txt:{number}: {line!r} is not name==version"
        name = normalize(match["name"])
        assert name not in pins, f"constraints.txt:{number}: {name} pinned twice"
        pins[name] = match["version"]
    return pins


def _makefile() -> str:
    return (ROOT / "Makefile").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def lock() -> dict[str, str]:
    return read_lock(LOCK.read_text(encoding="utf-8"))


def test_lock_has_a_header_saying_how_it_is_made() -> None:
    assert "make lock" in LOCK.read_text(encoding="utf-8").split("\n", 3)[1]


def test_every_declared_dependency_is_pinned_within_its_range(lock: dict[str, str]) -> None:
    # A pyproject change without `make lock` leaves a dependency unpinned or outside its new range.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    declared = [line for lines in [project["dependencies"], *extras.values()] for line in lines]
    assert len(declared) > 20
    for line in declared:
        requirement = Requirement(line)
        name = normalize(requirement.name)
        if name == normalize(project["name"]):
            continue  # an extra made of other extras (all, demo): those are checked themselves
        assert name in lock, f"{requirement.name} is not in constraints.txt: run make lock"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"{requirement.name}=={lock[name]} is outside {line!r}: run make lock"
        )


def test_makefile_specs_agree_with_the_lock(lock: dict[str, str]) -> None:
    specs = dict(re.findall(r"^(\w+_SPEC) \?= (\S+)$", _makefile(), re.MULTILINE))
    assert {"TORCH_SPEC", "OPEN_CLIP_SPEC", "MINILM_SPEC"} <= specs.keys()
    for variable, spec in specs.items():
        requirement = Requirement(spec)
        name = normalize(requirement.name)
        assert name in lock, f"{variable}: {requirement.name} is not in constraints.txt"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"{variable}={spec}, constraints.txt {lock[name]}"
        )


def test_makefile_installs_take_the_versions_from_the_lock() -> None:
    # The recipes as make expands them (-n: print only; -B: as if nothing were installed yet).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(
        ["make", "-n", "-B", "install", "bench-retrieval"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    installs = [
        shlex.split(line)
        for line in result.stdout.splitlines()
        if re.search(r"\bpip install\b", line) and not line.lstrip().startswith("#")
    ]
    # pip, torch, the project with its all and dev extras, open_clip, MiniLM; the retrieval peers.
    assert len(installs) >= 6, result.stdout
    for argv in installs:
        assert "-c" in argv, shlex.join(argv)
        assert argv[argv.index("-c") + 1] == "constraints.txt", shlex.join(argv)
    # A changed lock reinstalls: the stamp depends on it.
    assert re.search(r"^\$\(STAMP\):.*\$\(CONSTRAINTS\)", _makefile(), re.MULTILINE)


def test_venv_matches_the_lock(lock: dict[str, str]) -> None:
    # Only a venv `make install` built (its stamp file) is held to the lock; any other interpreter
    # running the tests made its own choices.
    if not (Path(sys.prefix) / ".installed").is_file():
        pytest.skip(f"{sys.prefix} is not a venv built by make install")
    installed = {normalize(dist.metadata["Name"]): dist.version for dist in distributions()}
    wrong = {
        name: f"{installed.get(name, 'missing')}, pinned {version}"
        for name, version in lock.items()
        # == without a local label matches any build: 2.13.0+cpu is torch==2.13.0.
        if name not in installed or not Specifier(f"=={version}").contains(installed[name])
    }
    assert not wrong, (
        f"the venv differs from constraints.txt ({wrong}); "
        f"reinstall with: rm {sys.prefix}/.installed && make install"
    )
