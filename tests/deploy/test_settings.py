"""The environment that docker-compose.yml and the Kubernetes manifests give each service is
accepted by that service's own settings class, and names only fields it has (pydantic-settings
ignores unknown variables, so a typo would otherwise pass silently)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from crossmodal.stack import SERVICES, ServiceSpec
from shared.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
NAMES = [spec.name for spec in SERVICES]


def settings_class(spec: ServiceSpec) -> type[ServiceSettings]:
    module_name = f"services.{spec.name}.settings"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            pytest.skip(f"{module_name} does not exist yet")
        raise
    (cls,) = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, ServiceSettings)
        and obj is not ServiceSettings
        and obj.__module__ == module_name
    ]
    return cls


def compose_env(spec: ServiceSpec) -> dict[str, str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    return {k: str(v) for k, v in compose["services"][spec.name]["environment"].items()}


def k8s_env(spec: ServiceSpec) -> dict[str, str]:
    docs = [
        doc
        for path in (ROOT / "deploy/k8s/base").glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc
    ]
    config = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "crossmodal-config"
    )["data"]
    workload = next(
        d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == spec.name
    )
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    env = {k: str(v) for k, v in config.items()}
    env.update({e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e})
    # A Secret's value, of the strength production asks for.
    env.update(
        {
            e["name"]: f"a-secret-from-{e['valueFrom']['secretKeyRef']['name']}-of-32-characters"
            for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
    )
    return env


def load(cls: type[ServiceSettings], spec: ServiceSpec, env: dict[str, str], monkeypatch) -> Any:
    for key in list(os.environ):
        if key.upper().startswith(spec.env_prefix):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return cls()


@pytest.mark.parametrize("source", [compose_env, k8s_env], ids=["compose", "k8s"])
@pytest.mark.parametrize("spec", SERVICES, ids=NAMES)
def test_the_service_accepts_its_environment(spec, source, monkeypatch) -> None:
    cls = settings_class(spec)
    env = source(spec)
    mine = {key: value for key, value in env.items() if key.startswith(spec.env_prefix)}
    unknown = {key for key in mine if key[len(spec.env_prefix) :].lower() not in cls.model_fields}
    assert not unknown, f"{cls.__name__} has no field for {sorted(unknown)}"
    settings = load(cls, spec, env, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.port == spec.port
