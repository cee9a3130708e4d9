"""docker-compose.yml: valid against the Compose Specification schema, and in agreement with the
stack table (crossmodal/stack.py) on services, commands, env prefixes and ports."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from crossmodal.stack import SERVICES

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "compose-spec.json"
NAMES = [spec.name for spec in SERVICES]
INFRA = {"redis", "prometheus", "grafana"}
PUBLISHED = {"gateway", "prometheus", "grafana"}

# The values the services are configured with (the gateway's names are the lead's choice).
REQUIRED_ENV = {
    "gateway": {
        "GATEWAY_AUTH_URL": "http://auth:8001",
        "GATEWAY_FEATURE_URL": "http://feature:8002",
        "GATEWAY_RETRIEVAL_URL": "http://retrieval:8003",
        "GATEWAY_METADATA_URL": "http://metadata:8004",
        "GATEWAY_REDIS_URL": "redis://redis:6379/0",
    },
    "feature": {"FEATURE_MODEL": "/models/demo"},
    "retrieval": {"RETRIEVAL_DATA_DIR": "/data/retrieval"},
    "metadata": {
        "METADATA_DATABASE_URL": "sqlite:////data/metadata/metadata.db",
        "METADATA_IMAGE_DIR": "/data/metadata/images",
    },
    "auth": {
        "AUTH_DATABASE_URL": "sqlite:////data/auth/auth.db",
        "AUTH_PRIVATE_KEY_PATH": "/data/auth/signing-key.pem",
    },
}
# Settings read by libraries rather than by the service (so without its prefix).
LIBRARY_ENV = {"HF_HUB_OFFLINE"}


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _memory(value: str) -> int:
    """Compose's byte values: 512M, 4G, 64m, 1gb."""
    match = re.fullmatch(r"(\d+)([bkmg])?b?", str(value).lower())
    assert match, f"not a byte value: {value!r}"
    return int(match[1]) * 1024 ** "bkmg".index(match[2] or "b")


def _validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_vendored_schema_is_the_recorded_one() -> None:
    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest in (HERE / "COMPOSE_SPEC_SOURCE.md").read_text(encoding="utf-8"), (
        "compose-spec.json changed: re-vendor it with update_compose_schema.py and record it"
    )


@pytest.mark.parametrize("path", ["docker-compose.yml", "deploy/compose/gpu.yml"])
def test_compose_file_matches_the_compose_spec(root: Path, path: str) -> None:
    document = yaml.safe_load((root / path).read_text(encoding="utf-8"))
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )


def test_the_schema_rejects_what_it_should() -> None:
    # Guards against a schema that accepts anything (e.g. a broken extraction).
    validator = _validator()
    assert not validator.is_valid({"services": {"x": {"imagee": "redis"}}})
    assert not validator.is_valid(
        {"services": {"x": {"depends_on": {"y": {"condition": "service_up"}}}}}
    )


def test_services_are_the_stack_plus_infrastructure(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == set(NAMES) | INFRA


@pytest.mark.parametrize("spec", SERVICES, ids=NAMES)
def test_service_is_built_from_its_dockerfile(root: Path, compose: dict[str, Any], spec) -> None:
    build = compose["services"][spec.name]["build"]
    assert build["context"] == "."
    assert build["dockerfile"] == f"services/{spec.name}/Dockerfile"
    assert (root / build["dockerfile"]).is_file()


@pytest.mark.parametrize("spec", SERVICES, ids=NAMES)
def test_build_args_have_values_that_default_to_the_dockerfiles(
    root: Path, compose: dict[str, Any], spec
) -> None:
    # A mapping with explicit values: a bare name would leave the value to the Compose version
    # (unset, empty, or the Dockerfile's default). ${VAR:-default} still takes the environment.
    args = compose["services"][spec.name]["build"].get("args", {})
    assert isinstance(args, dict), "build args as a mapping of names to values"
    dockerfile = (root / "services" / spec.name / "Dockerfile").read_text(encoding="utf-8")
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    for name, value in args.items():
        match = re.fullmatch(r"\$\{(\w+):-(.+)\}", str(value))
        assert match, f"{name}: {value!r} is not ${{{name}:-default}}"
        assert match[1] == name
        assert defaults.get(name) == match[2], f"{name}: the Dockerfile's default is not {match[2]}"
    expected = {"TORCH_INDEX_URL", "TORCH_SPEC"} if spec.name == "feature" else set()
    assert set(args) == expected


def test_the_file_says_it_needs_compose_v2(root: Path, compose: dict[str, Any]) -> None:
    # The top-level name (and deploy.resources outside Swarm) need Compose v2 or later.
    assert compose["name"] == "crossmodal"
    lines = (root / "docker-compose.yml").read_text(encoding="utf-8").splitlines()
    header = " ".join(itertools.takewhile(lambda line: line.startswith("#"), lines))
    assert "Compose v2" in header


@pytest.mark.parametrize("name", [*NAMES, *sorted(INFRA)])
def test_every_container_has_cpu_and_memory_limits(compose: dict[str, Any], name: str) -> None:
    resources = compose["services"][name].get("deploy", {}).get("resources", {})
    limits, reservations = resources.get("limits", {}), resources.get("reservations", {})
    assert {"cpus", "memory"} <= limits.keys(), f"{name}: deploy.resources.limits"
    assert {"cpus", "memory"} <= reservations.keys(), f"{name}: deploy.resources.reservations"
    # Docker refuses a CPU limit above the host's CPU count; the stack must start on 2 cores.
    assert 0 < float(reservations["cpus"]) <= float(limits["cpus"]) <= 2
    assert 0 < _memory(reservations["memory"]) <= _memory(limits["memory"])


def test_the_feature_service_gets_the_most_memory(compose: dict[str, Any]) -> None:
    for part in ("limits", "reservations"):
        memory = {
            name: _memory(service["deploy"]["resources"][part]["memory"])
            for name, service in compose["services"].items()
        }
        assert max(memory, key=memory.__getitem__) == "feature", (part, memory)
        assert sorted(memory.values())[-2] < memory["feature"], (part, memory)


@pytest.mark.parametrize("spec", SERVICES, ids=NAMES)
def test_service_runs_the_stack_command(compose: dict[str, Any], spec) -> None:
    assert compose["services"][spec.name]["command"] == spec.command("python")


@pytest.mark.parametrize("spec", SERVICES, ids=NAMES)
def test_service_env_uses_its_prefix_and_port(compose: dict[str, Any], spec) -> None:
    env = _env(compose["services"][spec.name])
    assert env[f"{spec.env_prefix}HOST"] == "0.0.0.0"
    assert env[f"{spec.env_prefix}PORT"] == str(spec.port)
    stray = {key for key in env if not key.startswith(spec.env_prefix)} - LIBRARY_ENV
    assert not stray, f"{spec.name} sets variables outside {spec.env_prefix}*: {stray}"
    for key, value in REQUIRED_ENV[spec.name].items():
        assert env.get(key) == value, key


@pytest.mark.parametrize("spec", SERVICES, ids=NAMES)
def test_service_serves_metrics_on_its_metrics_port(compose: dict[str, Any], spec) -> None:
    env = _env(compose["services"][spec.name])
    assert env[f"{spec.env_prefix}METRICS_PORT"] == str(spec.metrics_port)


@pytest.mark.parametrize("spec", [s for s in SERVICES if s.name not in ("auth", "gateway")])
def test_internal_services_verify_their_callers_with_auth(compose: dict[str, Any], spec) -> None:
    env = _env(compose["services"][spec.name])
    assert env[f"{spec.env_prefix}AUTH_URL"] == "http://auth:8001"


def test_client_secrets_come_from_compose_secrets(compose: dict[str, Any]) -> None:
    declared = compose["secrets"]
    mounted = {
        name: {(s["source"], s["target"]) for s in compose["services"][name]["secrets"]}
        for name in ("auth", "gateway")
    }
    assert mounted == {
        "auth": {
            ("gateway_client_secret", "AUTH_GATEWAY_CLIENT_SECRET"),
            ("reconcile_client_secret", "AUTH_RECONCILE_CLIENT_SECRET"),
        },
        "gateway": {("gateway_client_secret", "GATEWAY_CLIENT_SECRET")},
    }
    # Read from the environment of `docker compose up`, never written in the file.
    assert {name: secret["environment"] for name, secret in declared.items()} == {
        "gateway_client_secret": "CROSSMODAL_GATEWAY_CLIENT_SECRET",
        "reconcile_client_secret": "CROSSMODAL_RECONCILE_CLIENT_SECRET",
    }
    for spec in SERVICES:
        assert not any("SECRET" in key for key in _env(compose["services"][spec.name]))


def test_gateway_urls_point_at_the_stack(compose: dict[str, Any]) -> None:
    env = _env(compose["services"]["gateway"])
    for spec in SERVICES:
        if spec.name != "gateway":
            assert env[f"GATEWAY_{spec.name.upper()}_URL"] == f"http://{spec.name}:{spec.port}"


def test_only_gateway_prometheus_and_grafana_publish_ports(compose: dict[str, Any]) -> None:
    publishing = {name for name, service in compose["services"].items() if service.get("ports")}
    assert publishing == PUBLISHED


@pytest.mark.parametrize(
    ("service", "container_port"), [("gateway", 8000), ("prometheus", 9090), ("grafana", 3000)]
)
def test_published_port(compose: dict[str, Any], service: str, container_port: int) -> None:
    (entry,) = compose["services"][service]["ports"]
    target = entry["target"] if isinstance(entry, dict) else int(str(entry).rsplit(":", 1)[-1])
    assert target == container_port


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


@pytest.mark.parametrize("spec", SERVICES, ids=NAMES)
def test_healthcheck_asks_healthz_with_python(compose: dict[str, Any], spec) -> None:
    test = compose["services"][spec.name]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert "/healthz" in test[3]
    assert f"{spec.env_prefix}PORT" in test[3]


def test_depends_on_waits_for_healthy_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway_deps = services["gateway"]["depends_on"]
    assert set(gateway_deps) == {"redis"} | {n for n in NAMES if n != "gateway"}
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert services[dependency].get("healthcheck"), dependency


def test_data_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    mounts = {
        "auth": "/data/auth",
        "retrieval": "/data/retrieval",
        "metadata": "/data/metadata",
        "prometheus": "/prometheus",
        "grafana": "/var/lib/grafana",
    }
    for name, target in mounts.items():
        volumes = [str(v) for v in compose["services"][name]["volumes"]]
        named = [v for v in volumes if v.split(":")[1] == target and v.split(":")[0] in declared]
        assert named, f"{name}: no named volume at {target}"


def test_model_is_mounted_read_only_where_feature_model_points(compose: dict[str, Any]) -> None:
    feature = compose["services"]["feature"]
    model = _env(feature)["FEATURE_MODEL"]
    volumes = [str(v) for v in feature["volumes"]]
    # Defaults to where `make demo-model` writes the offline demo model.
    assert volumes == [f"${{CROSSMODAL_MODEL_DIR:-./var/demo/model}}:{model}:ro"]


def test_monitoring_mounts_the_repository_config(root: Path, compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus
    assert (
        "--config.file=/etc/prometheus/prometheus.yml"
        in compose["services"]["prometheus"]["command"]
    )
    grafana = compose["services"]["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./deploy/grafana/dashboards:/etc/grafana/dashboards:ro" in grafana
    # The dashboards provider reads the directory that compose mounts.
    providers = yaml.safe_load(
        (root / "deploy/grafana/provisioning/dashboards/dashboards.yml").read_text()
    )
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"


def _compose_cli() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(command[0]):
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, text=True)
        version = re.search(r"(\d+)\.\d+", probe.stdout)
        if probe.returncode == 0 and version and int(version[1]) >= 2:
            return command
    return None


def test_docker_compose_accepts_the_files(root: Path) -> None:
    """The real parser, where Docker Compose v2 or later is installed (no daemon needed)."""
    command = _compose_cli()
    if command is None:
        pytest.skip("Docker Compose v2+ is not installed (optional: the schema test covers this)")
    for files in (["docker-compose.yml"], ["docker-compose.yml", "deploy/compose/gpu.yml"]):
        args = [arg for f in files for arg in ("-f", f)]
        result = subprocess.run(
            [*command, *args, "config", "--quiet"], cwd=root, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
