"""deploy/k8s: the base's manifests parse and validate against the Kubernetes schemas, agree
with the stack table (crossmodal/stack.py) and are hardened; every overlay, and prod with the
optional components, renders with `kubectl kustomize` and validates too; the PrometheusRule is
alerts.yml's rules."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from crossmodal.stack import SERVICES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "k8s"
K8S = DEPLOY / "base"
NAMES = [spec.name for spec in SERVICES]
# The single-writer StatefulSets and the mount path of their claim.
STATEFUL = {
    "auth": "/data/auth",
    "retrieval": "/data/retrieval",
    "metadata": "/data/metadata",
    "redis": "/data",
}
# Stateless, so replicated: spread over nodes, a PDB each, an HPA each in prod.
REPLICATED = {"gateway", "feature"}
# Manifests kept beside the kustomization but applied by hand (documented in README.md).
OPTIONAL = {
    "ingress.yaml",
    "auth-signing-key.secret.example.yaml",
    "auth-bootstrap.secret.example.yaml",
    "service-clients.secret.example.yaml",
    "redis.secret.example.yaml",
}
# The oldest Kubernetes minor these manifests promise to work on; rendered overlays are also
# checked against the newest schemas kubernetes-validate has (removed or renamed fields).
KUBERNETES_VERSION = "1.30"
WORKLOADS = {"Deployment", "StatefulSet"}
# Custom resources of the Prometheus Operator: no schema in kubernetes-validate, checked below.
OPERATOR_GROUP = "monitoring.coreos.com"
# What `kubectl kustomize` renders: the overlays, and prod with every optional component.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("base", []),
    "dev": ("overlays/dev", []),
    "prod": ("overlays/prod", []),
    "prod+gpu": ("overlays/prod", ["gpu"]),
    "prod+feature-queue-hpa": ("overlays/prod", ["feature-queue-hpa"]),
    "prod+gpu+feature-queue-hpa": ("overlays/prod", ["gpu", "feature-queue-hpa"]),
}


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
RESOURCES = [K8S / name for name in KUSTOMIZATION["resources"]]
DOCS = [doc for path in RESOURCES for doc in _load(path)]
ALL_FILES = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _find(kind: str, name: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    docs = DOCS if docs is None else docs
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def _workload(name: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    docs = DOCS if docs is None else docs
    matches = [d for d in docs if d["kind"] in WORKLOADS and d["metadata"]["name"] == name]
    assert len(matches) == 1, name
    return matches[0]


def _containers(
    docs: list[dict[str, Any]] | None = None, *, init: bool = True
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    docs = DOCS if docs is None else docs
    fields = ("initContainers", "containers") if init else ("containers",)
    return [
        (doc, container)
        for doc in docs
        if doc["kind"] in WORKLOADS
        for field in fields
        for container in doc["spec"]["template"]["spec"].get(field, [])
    ]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "extend _matches for matchExpressions"
    return selector["matchLabels"].items() <= labels.items()


# ---- the base's files ---------------------------------------------------------------------


def test_every_manifest_is_listed_or_documented_as_optional() -> None:
    listed = {path.name for path in RESOURCES}
    assert {path.name for path in ALL_FILES} == listed | OPTIONAL
    assert not listed & OPTIONAL
    assert KUSTOMIZATION["namespace"] == "crossmodal"


def _validate(validator: Any, doc: dict[str, Any], version: str, where: str) -> None:
    try:
        validator.validate(doc, version, strict=True)
    except Exception as exc:  # its errors carry the detail in .message
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} ({version}): {exc}")


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(require_module, path: Path) -> None:
    validator = require_module("kubernetes_validate")
    for doc in _load(path):
        _validate(validator, doc, KUBERNETES_VERSION, path.name)


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_manifests_are_well_formed(path: Path) -> None:
    # The schema-free minimum, so a machine without kubernetes-validate still catches the worst.
    for doc in _load(path):
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
        assert doc["metadata"].get("name"), path.name
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "crossmodal", path.name


def test_the_stack_is_complete() -> None:
    for name in [*NAMES, "redis"]:
        _workload(name)
        _find("Service", name)
    _find("Namespace", "crossmodal")
    _find("ConfigMap", "crossmodal-config")


@pytest.mark.parametrize("name", [*NAMES, "redis"])
def test_services_are_cluster_internal_and_select_their_pods(name: str) -> None:
    service = _find("Service", name)
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"].get("clusterIP") != "None"  # the headless one is another Service
    template_labels = _workload(name)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()


@pytest.mark.parametrize("spec", SERVICES, ids=NAMES)
def test_container_runs_the_stack_command_on_its_port(spec) -> None:
    workload = _workload(spec.name)
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    assert container["command"] == spec.command("python")
    assert "args" not in container
    ports = [(p["name"], p["containerPort"]) for p in container["ports"]]
    assert ports == [("http", spec.port), ("metrics", spec.metrics_port)]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env[f"{spec.env_prefix}HOST"] == "0.0.0.0"
    assert env[f"{spec.env_prefix}PORT"] == str(spec.port)
    assert env[f"{spec.env_prefix}METRICS_PORT"] == str(spec.metrics_port)
    assert container["image"].split(":")[0] == f"crossmodal/{spec.name}"
    (port,) = _find("Service", spec.name)["spec"]["ports"]
    assert port["port"] == spec.port


@pytest.mark.parametrize("spec", SERVICES, ids=NAMES)
def test_probes(spec) -> None:
    (container,) = _workload(spec.name)["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("spec", SERVICES, ids=NAMES)
def test_prometheus_scrape_annotations(spec) -> None:
    # Kept for Prometheus without the operator (deploy/prometheus/prometheus-kubernetes.yml).
    annotations = _workload(spec.name)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(spec.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def _check_resources(docs: list[dict[str, Any]]) -> None:
    for doc, container in _containers(docs):
        where = f"{doc['metadata']['name']}/{container['name']}"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"].get(kind, {})), (where, kind)
    for doc, container in _containers(docs, init=False):
        where = f"{doc['metadata']['name']}/{container['name']}"
        assert "readinessProbe" in container and "livenessProbe" in container, where


def test_every_container_has_probes_and_resources() -> None:
    _check_resources(DOCS)


def _check_hardened(docs: list[dict[str, Any]]) -> None:
    for doc, container in _containers(docs):
        where = f"{doc['metadata']['name']}/{container['name']}"
        pod = doc["spec"]["template"]["spec"]
        # The container's securityContext overrides the pod's, field by field.
        context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True, where
        assert context.get("runAsUser", 1) != 0, where
        assert context.get("allowPrivilegeEscalation") is False, where
        assert context.get("readOnlyRootFilesystem") is True, where
        assert "ALL" in context.get("capabilities", {}).get("drop", []), where
        assert not context.get("capabilities", {}).get("add"), where
        assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert not context.get("privileged"), where
        assert pod.get("automountServiceAccountToken") is False, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
    for doc, container in _containers(docs, init=False):
        # A read-only root needs a writable /tmp, from an emptyDir.
        where = f"{doc['metadata']['name']}/{container['name']}"
        pod = doc["spec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], where


def test_every_container_is_hardened() -> None:
    _check_hardened(DOCS)


@pytest.mark.parametrize("spec", SERVICES, ids=NAMES)
def test_service_links_are_off(spec) -> None:
    # Otherwise Kubernetes injects e.g. GATEWAY_PORT=tcp://10.0.0.1:8000 next to the settings.
    assert _workload(spec.name)["spec"]["template"]["spec"]["enableServiceLinks"] is False


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_stateful_services_run_one_pod_on_a_volume(name: str) -> None:
    workload = _workload(name)
    assert workload["kind"] == "StatefulSet"
    spec = workload["spec"]
    assert spec["replicas"] == 1
    # Deleting or scaling the StatefulSet never deletes the data.
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claim = mounts[STATEFUL[name]]
    # The claim comes from the template (one per pod, kept across reschedules), not a volume.
    assert claim not in {v["name"] for v in pod.get("volumes", [])}
    (template,) = [t for t in spec["volumeClaimTemplates"] if t["metadata"]["name"] == claim]
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert template["spec"]["resources"]["requests"]["storage"]
    assert not [d for d in DOCS if d["kind"] == "PersistentVolumeClaim"]
    # Its governing Service is headless and selects its pods.
    headless = _find("Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= pod_labels(workload).items()


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("name", sorted(REPLICATED))
def test_replicated_services_spread_over_nodes_and_zones(name: str) -> None:
    workload = _workload(name)
    assert workload["kind"] == "Deployment"
    assert workload["spec"]["replicas"] >= 2
    assert workload["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    constraints = {
        c["topologyKey"]: c
        for c in workload["spec"]["template"]["spec"]["topologySpreadConstraints"]
    }
    assert set(constraints) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    # Hard across nodes; soft across zones, so a cluster without zone labels still schedules.
    assert constraints["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert constraints["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
    for constraint in constraints.values():
        assert _matches(constraint["labelSelector"], pod_labels(workload))
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]
        assert constraint["maxSkew"] == 1


def _check_disruption_budgets(docs: list[dict[str, Any]]) -> None:
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    covered = set()
    for budget in budgets:
        selected = [
            w["metadata"]["name"]
            for w in docs
            if w["kind"] in WORKLOADS and _matches(budget["spec"]["selector"], pod_labels(w))
        ]
        assert selected == [budget["metadata"]["name"]], budget["metadata"]["name"]
        # One pod at a time at any replica count; never minAvailable, which would block every
        # drain of a one-pod overlay (dev).
        assert budget["spec"] == {
            "maxUnavailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": budget["spec"]["selector"],
        }
        covered |= set(selected)
    assert covered == REPLICATED


def test_replicated_services_have_a_disruption_budget() -> None:
    _check_disruption_budgets(DOCS)


def test_settings() -> None:
    data = _find("ConfigMap", "crossmodal-config")["data"]
    for spec in SERVICES:
        if spec.name != "gateway":
            assert data[f"GATEWAY_{spec.name.upper()}_URL"] == f"http://{spec.name}:{spec.port}"
    assert data["GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
    assert data["FEATURE_MODEL"] == "/models/demo"
    assert data["RETRIEVAL_DATA_DIR"] == "/data/retrieval"
    assert data["METADATA_DATABASE_URL"] == "sqlite:////data/metadata/metadata.db"
    assert data["METADATA_IMAGE_DIR"] == "/data/metadata/images"
    assert data["AUTH_DATABASE_URL"] == "sqlite:////data/auth/auth.db"
    for spec in SERVICES:
        if spec.name not in ("auth", "gateway"):  # they verify their callers against the JWKS
            assert data[f"{spec.env_prefix}AUTH_URL"] == "http://auth:8001"
    # HOST/PORT belong to each container, next to its containerPort.
    assert not {key for key in data if key.endswith(("_HOST", "_PORT"))}
    # Passwords come from Secrets, never from the ConfigMap (nor inside the Redis URL).
    assert not {key for key in data if "PASSWORD" in key}
    assert "@" not in data["GATEWAY_REDIS_URL"]


def test_the_model_comes_from_the_model_image_not_a_volume_filled_by_hand() -> None:
    data = _find("ConfigMap", "crossmodal-config")["data"]
    pod = _workload("feature")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (container,) = pod["containers"]
    assert init["image"].split(":")[0] == "crossmodal/model"
    # It copies the image's /model into the folder the server reads as FEATURE_MODEL.
    assert init["command"] == ["cp", "-R", "/model/.", f"{data['FEATURE_MODEL']}/"]
    (init_mount,) = init["volumeMounts"]
    assert init_mount["mountPath"] == data["FEATURE_MODEL"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == init_mount["name"])
    assert mount["mountPath"] == data["FEATURE_MODEL"] and mount["readOnly"] is True
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    assert set(volume) == {"name", "emptyDir"}
    # deploy/model/Dockerfile puts the model folder where the init container copies from.
    dockerfile = (ROOT / "deploy" / "model" / "Dockerfile").read_text(encoding="utf-8")
    instructions = [line.split() for line in dockerfile.splitlines() if line[:1].isupper()]
    copies = [words for words in instructions if words[0] == "COPY"]
    assert [words[-2:] for words in copies] == [[".", "/model/"]]
    assert ["USER", "10001:10001"] in instructions
    assert {"name": "crossmodal/model", "newTag": "demo"} in KUSTOMIZATION["images"]


def test_signing_key_comes_from_a_secret_that_is_not_committed() -> None:
    data = _find("ConfigMap", "crossmodal-config")["data"]
    key_dir, _, key_file = data["AUTH_PRIVATE_KEY_PATH"].rpartition("/")
    pod = _workload("auth")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == key_dir)
    assert mount.get("readOnly") is True
    secret = {v["name"]: v for v in pod["volumes"]}[mount["name"]]["secret"]
    example = _load(K8S / "auth-signing-key.secret.example.yaml")[0]
    assert secret["secretName"] == example["metadata"]["name"]
    assert key_file in example["stringData"]
    assert not [d for d in DOCS if d["kind"] == "Secret"], "a Secret in the kustomization"


def test_auth_bootstrap_secrets_are_optional_and_override_the_config() -> None:
    # Production refuses the default "demo" user, so the config must name none ...
    data = _find("ConfigMap", "crossmodal-config")["data"]
    assert data["AUTH_ENVIRONMENT"] == "production"
    assert data["AUTH_BOOTSTRAP_USERS"] == "[]"
    # ... and real ones come from an optional Secret listed after the ConfigMap (the last wins).
    (container,) = _workload("auth")["spec"]["template"]["spec"]["containers"]
    sources = container["envFrom"]
    assert sources[0] == {"configMapRef": {"name": "crossmodal-config"}}
    example = _load(K8S / "auth-bootstrap.secret.example.yaml")[0]
    assert sources[-1] == {"secretRef": {"name": example["metadata"]["name"], "optional": True}}
    assert set(example["stringData"]) == {"AUTH_BOOTSTRAP_USERS", "AUTH_BOOTSTRAP_CLIENTS"}


def test_no_private_key_anywhere_in_deploy() -> None:
    for path in [*ROOT.joinpath("deploy").rglob("*"), ROOT / "docker-compose.yml"]:
        if path.is_file():
            assert "PRIVATE KEY-----" not in path.read_text(encoding="utf-8", errors="ignore"), path


def _policies() -> list[dict[str, Any]]:
    return [d for d in DOCS if d["kind"] == "NetworkPolicy"]


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"]  # {} selects every pod
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", "extend _selects for other operators"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_namespace_denies_ingress_by_default() -> None:
    assert any(
        p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
        and not p["spec"].get("ingress")
        for p in _policies()
    )  # fmt: skip


MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
# The pods that call each internal one: the gateway, and auth's JWKS for the services that
# verify their callers' tokens.
CALLED_BY = {
    "auth": {"gateway", "feature", "retrieval", "metadata"},
    "feature": {"gateway"},
    "retrieval": {"gateway"},
    "metadata": {"gateway"},
    "redis": {"gateway"},
}


def _rules(name: str) -> list[dict[str, Any]]:
    labels = pod_labels(_workload(name))
    return [
        rule
        for policy in _policies()
        if _selects(policy, labels)
        for rule in policy["spec"].get("ingress", [])
    ]


def _pod_names(peer: dict[str, Any]) -> set[str]:
    selector = peer["podSelector"]
    names = set(selector.get("matchLabels", {}).values())
    for expression in selector.get("matchExpressions", []):
        assert expression["key"] == "app.kubernetes.io/name" and expression["operator"] == "In"
        names |= set(expression["values"])
    return names


@pytest.mark.parametrize("name", sorted(CALLED_BY))
def test_only_their_callers_reach_internal_pods(name: str) -> None:
    rules = _rules(name)
    assert rules, f"no ingress rule lets anything reach {name}"
    for rule in rules:
        peers = rule.get("from")
        assert peers, f"{name}: a rule without 'from' admits every source"
        ports = {p["port"] for p in rule["ports"]}
        for peer in peers:
            if peer == MONITORING:
                # Prometheus' namespace reaches the metrics port and nothing else.
                assert ports == {"metrics"}, (name, ports)
                assert name != "redis"
            else:
                assert set(peer) == {"podSelector"}, (name, peer)  # this namespace only
                assert _pod_names(peer) <= CALLED_BY[name], (name, peer)
                assert "metrics" not in ports, name


@pytest.mark.parametrize("spec", SERVICES, ids=NAMES)
def test_monitoring_reaches_every_metrics_port(spec) -> None:
    scraped = [rule for rule in _rules(spec.name) if MONITORING in rule.get("from", [])]
    assert [{p["port"] for p in rule["ports"]} for rule in scraped] == [{"metrics"}]
    (container,) = _workload(spec.name)["spec"]["template"]["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["metrics"] == spec.metrics_port


def _secret_refs(container: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {
        name: e["valueFrom"]["secretKeyRef"]
        for name, e in _env(container).items()
        if "secretKeyRef" in e.get("valueFrom", {})
    }


@pytest.mark.parametrize(
    ("name", "variables"),
    [
        ("auth", {"AUTH_GATEWAY_CLIENT_SECRET": "gateway", "AUTH_RECONCILE_CLIENT_SECRET": "reconcile"}),
        ("gateway", {"GATEWAY_CLIENT_SECRET": "gateway"}),
    ],
)  # fmt: skip
def test_client_secrets_come_from_a_secret_that_is_not_committed(
    name: str, variables: dict[str, str]
) -> None:
    example = _load(K8S / "service-clients.secret.example.yaml")[0]
    (container,) = _workload(name)["spec"]["template"]["spec"]["containers"]
    refs = {
        variable: ref
        for variable, ref in _secret_refs(container).items()
        if ref["name"] == example["metadata"]["name"]
    }
    assert refs == {
        variable: {"name": example["metadata"]["name"], "key": key}
        for variable, key in variables.items()
    }
    assert set(example["stringData"]) == {"gateway", "reconcile"}
    data = _find("ConfigMap", "crossmodal-config")["data"]
    assert not {key for key in data if "SECRET" in key}


def test_redis_requires_a_password_from_a_secret_that_is_not_committed() -> None:
    example = _load(K8S / "redis.secret.example.yaml")[0]
    password = {"name": example["metadata"]["name"], "key": "password"}
    assert set(example["stringData"]) == {"password"}
    (redis,) = _workload("redis")["spec"]["template"]["spec"]["containers"]
    assert _secret_refs(redis) == {"REDISCLI_AUTH": password}
    # requirepass goes into the config file written at start, never onto the command line.
    script = redis["command"][-1]
    assert "requirepass" in script and "$REDISCLI_AUTH" in script
    assert "--requirepass" not in " ".join(redis["command"])
    assert "exec redis-server /tmp/redis.conf" in script
    # Its probe authenticates (redis-cli reads REDISCLI_AUTH) and wants PONG, not just any reply.
    assert "redis-cli ping | grep -q PONG" in redis["readinessProbe"]["exec"]["command"][-1]
    # Every Redis client has it: the gateway only (NetworkPolicy), under its settings name.
    (gateway,) = _workload("gateway")["spec"]["template"]["spec"]["containers"]
    assert _secret_refs(gateway)["GATEWAY_REDIS_PASSWORD"] == password


def _redis_config() -> dict[str, str]:
    text = _find("ConfigMap", "redis-config")["data"]["redis.conf"]
    lines = [line.split(None, 1) for line in text.splitlines() if line and line[0] != "#"]
    return {key: value for key, value in lines}


def test_redis_keeps_every_acknowledged_write() -> None:
    config = _redis_config()
    assert config["appendonly"] == "yes"
    # fsynced before the reply: a write version lost after its bump was acknowledged would make
    # stale cached pages reachable again (docs/security.md, "Caching").
    assert config["appendfsync"] == "always"
    assert config["save"] == '""'  # the append-only file alone
    assert config["dir"] == STATEFUL["redis"]
    assert "requirepass" not in config  # only from the Secret, at start
    # Evicts only keys with a TTL, never the write versions or the back-off counts.
    assert config["maxmemory-policy"] == "volatile-lru"
    (redis,) = _workload("redis")["spec"]["template"]["spec"]["containers"]
    limit = redis["resources"]["limits"]["memory"]
    assert limit.endswith("Mi") and int(limit[:-2]) >= 2 * int(config["maxmemory"][:-2])


def test_the_gateway_is_the_only_exposed_service() -> None:
    ingress = _load(K8S / "ingress.yaml")
    backends = {
        path["backend"]["service"]["name"]
        for doc in ingress
        for rule in doc["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    assert backends == {"gateway"}
    assert all(
        d["spec"].get("type", "ClusterIP") == "ClusterIP" for d in DOCS if d["kind"] == "Service"
    )


# ---- the PrometheusRule and the monitoring component ----------------------------------------


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "gen_prometheusrule", DEPLOY / "gen_prometheusrule.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_prometheus_rule_is_generated_from_alerts_yml() -> None:
    generator = _generator()
    committed = generator.OUTPUT.read_text(encoding="utf-8")
    assert committed == generator.render(), "run `make k8s-rules` after changing alerts.yml"
    # And the same rules, whatever the formatting.
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text(encoding="utf-8"))
    (rule,) = _load(generator.OUTPUT)
    assert rule["kind"] == "PrometheusRule" and rule["apiVersion"] == f"{OPERATOR_GROUP}/v1"
    assert rule["spec"]["groups"] == alerts["groups"]


MONITORING_DIR = DEPLOY / "components" / "monitoring"


def test_monitoring_component_lists_its_files() -> None:
    component = yaml.safe_load((MONITORING_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    assert component["kind"] == "Component"
    assert component["resources"] == ["podmonitors.yaml", "prometheusrule.yaml"]


@pytest.mark.parametrize("spec", SERVICES, ids=NAMES)
def test_a_pod_monitor_scrapes_every_metrics_port(spec) -> None:
    monitors = _load(MONITORING_DIR / "podmonitors.yaml")
    assert {m["kind"] for m in monitors} == {"PodMonitor"}  # no ServiceMonitor: see the file
    monitor = _find("PodMonitor", spec.name, monitors)
    assert monitor["metadata"]["namespace"] == "crossmodal"
    assert _matches(monitor["spec"]["selector"], pod_labels(_workload(spec.name)))
    # up{job="<service>"}, as in prometheus.yml and the ServiceDown alert.
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert pod_labels(_workload(spec.name))["app.kubernetes.io/name"] == spec.name
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    (container,) = _workload(spec.name)["spec"]["template"]["spec"]["containers"]
    assert {"name": "metrics", "containerPort": spec.metrics_port, "protocol": "TCP"} in container[
        "ports"
    ]


# ---- rendered overlays (kubectl kustomize) ---------------------------------------------------


@cache
def _render(variant: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # Not in Debian, so not on CI; the checks of the base's files above still run there.
        pytest.skip("kubectl is not installed (it renders the overlays: kubectl kustomize)")
    path, components = VARIANTS[variant]
    target = DEPLOY / path
    if components:
        # A throw-away overlay: the variant plus the components. kustomize wants relative paths.
        workdir = Path(tempfile.mkdtemp(prefix="crossmodal-k8s-"))
        relative = os.path.relpath(DEPLOY, workdir)
        (workdir / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [f"{relative}/{path}"],
                    "components": [f"{relative}/components/{c}" for c in components],
                }
            ),
            encoding="utf-8",
        )
        target = workdir
    try:
        result = subprocess.run(
            [kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=120
        )
    finally:
        if components:
            shutil.rmtree(target, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _rendered(variant: str) -> list[dict[str, Any]]:
    return list(_render(variant))


def test_kustomize_renders() -> None:
    rendered = _rendered("base")
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in DOCS
    )
    assert {d["metadata"].get("namespace", "crossmodal") for d in rendered} == {"crossmodal"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_validates(require_module, variant: str) -> None:
    rendered = _rendered(variant)
    validator = require_module("kubernetes_validate")
    newest = ".".join(validator.latest_version().split(".")[:2])
    for doc in rendered:
        assert doc["metadata"].get("namespace", "crossmodal") == "crossmodal", doc["metadata"]
        if doc["apiVersion"].startswith(f"{OPERATOR_GROUP}/"):
            continue  # a custom resource: test_a_pod_monitor_... and the rule test check them
        for version in sorted({KUBERNETES_VERSION, newest}):
            error = _schema_error(validator, json.dumps(doc, sort_keys=True), version)
            assert error is None, f"{variant}: {doc['kind']}/{doc['metadata']['name']}: {error}"


@cache
def _schema_error(validator: Any, doc: str, version: str) -> str | None:
    # Variants share most objects: each distinct one is validated once per version.
    try:
        validator.validate(json.loads(doc), version, strict=True)
    except Exception as exc:  # its errors carry the detail in .message
        return f"({version}) {getattr(exc, 'message', exc)}"
    return None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_is_hardened_with_requests_and_limits(variant: str) -> None:
    rendered = _rendered(variant)
    _check_resources(rendered)
    _check_hardened(rendered)
    _check_disruption_budgets(rendered)
    assert not [d for d in rendered if d["kind"] == "Secret"], "a Secret in the rendered output"


def test_dev_runs_one_pod_each_without_autoscaling_or_operator_objects() -> None:
    rendered = _rendered("dev")
    for doc in rendered:
        if doc["kind"] in WORKLOADS:
            assert doc["spec"]["replicas"] == 1, doc["metadata"]["name"]
    kinds = {d["kind"] for d in rendered}
    assert "HorizontalPodAutoscaler" not in kinds
    assert not {d["apiVersion"] for d in rendered if d["apiVersion"].startswith(OPERATOR_GROUP)}


@pytest.mark.parametrize("variant", ["prod", "prod+feature-queue-hpa"])
def test_prod_scales_the_replicated_services_with_hpas(variant: str) -> None:
    rendered = _rendered(variant)
    autoscalers = {
        d["metadata"]["name"]: d for d in rendered if d["kind"] == "HorizontalPodAutoscaler"
    }
    assert set(autoscalers) == REPLICATED
    for name, hpa in autoscalers.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        workload = _find("Deployment", name, rendered)
        # The HPA owns the count: an apply that set replicas would undo its scaling.
        assert "replicas" not in workload["spec"]
        assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
        assert cpu == [
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 70},
                },
            }
        ]
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["requests"]["cpu"]  # utilization is against the request
    # The monitoring component comes with prod.
    kinds = {(d["apiVersion"], d["kind"]) for d in rendered}
    assert (f"{OPERATOR_GROUP}/v1", "PodMonitor") in kinds
    assert (f"{OPERATOR_GROUP}/v1", "PrometheusRule") in kinds
    for workload in [d for d in rendered if d["kind"] == "StatefulSet"]:
        assert workload["spec"]["replicas"] == 1


def test_the_feature_hpa_scales_on_the_queue_with_the_adapter_component() -> None:
    plain = _find("HorizontalPodAutoscaler", "feature", _rendered("prod"))
    hpa = _find("HorizontalPodAutoscaler", "feature", _rendered("prod+feature-queue-hpa"))
    added = [m for m in hpa["spec"]["metrics"] if m not in plain["spec"]["metrics"]]
    (metric,) = added
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    # A metric the feature service exports ...
    code = (ROOT / "services" / "feature" / "metrics.py").read_text(encoding="utf-8")
    assert f'"{name}"' in code
    # ... and one the documented prometheus-adapter rule serves under that name.
    example = ROOT / "deploy/k8s/components/feature-queue-hpa/prometheus-adapter-rules.example.yaml"
    (rule,) = yaml.safe_load(example.read_text(encoding="utf-8"))["rules"]["custom"]
    assert rule["seriesQuery"].startswith(f"{name}{{")
    assert rule["name"]["as"] == name
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    # The other HPA is untouched.
    assert _find("HorizontalPodAutoscaler", "gateway", _rendered("prod+feature-queue-hpa")) == (
        _find("HorizontalPodAutoscaler", "gateway", _rendered("prod"))
    )


def test_the_gpu_component_changes_the_feature_pod_alone() -> None:
    plain = {(d["kind"], d["metadata"]["name"]): d for d in _rendered("prod")}
    gpu = {(d["kind"], d["metadata"]["name"]): d for d in _rendered("prod+gpu")}
    assert set(plain) == set(gpu)
    changed = {key for key in plain if plain[key] != gpu[key]}
    assert changed == {("Deployment", "feature")}
    pod = gpu[("Deployment", "feature")]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _env(container)["FEATURE_DEVICE"]["value"] == "cuda"  # no silent fall-back to CPU
    # The CUDA build of the base's tag.
    (before,) = plain[("Deployment", "feature")]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == before["image"] + "-cuda"
    for (kind, name), doc in gpu.items():
        if kind in WORKLOADS and name != "feature":
            text = json.dumps(doc)
            assert "nvidia.com/gpu" not in text and "tolerations" not in text, name


def test_the_gpu_device_setting_exists() -> None:
    from services.feature.settings import FeatureSettings

    assert FeatureSettings(device="cuda").device == "cuda"
