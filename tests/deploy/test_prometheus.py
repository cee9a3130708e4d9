"""deploy/prometheus: promtool accepts the config and the rules, the rule unit tests pass, and
the scrape config and the alerts cover the stack."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from crossmodal.stack import SERVICES

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERTS = {
    # alert: (severity, for)
    "HighErrorRatio": ("critical", "2m"),
    "HighLatencyP95": ("warning", "5m"),
    "ModelInferenceSlow": ("warning", "5m"),
    "CacheHitRatioLow": ("info", "15m"),
    "ServiceDown": ("critical", "1m"),
}


def _yaml(name: str) -> Any:
    return yaml.safe_load((PROMETHEUS / name).read_text(encoding="utf-8"))


def _rules() -> dict[str, dict[str, Any]]:
    return {
        rule["alert"]: rule
        for group in _yaml("alerts.yml")["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def _promtool(require_tool, *args: str) -> None:
    result = subprocess.run(
        [require_tool("promtool"), *args], cwd=PROMETHEUS, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config(require_tool) -> None:
    _promtool(require_tool, "check", "config", "prometheus.yml")


def test_promtool_check_config_for_kubernetes(require_tool) -> None:
    result = subprocess.run(
        [require_tool("promtool"), "check", "config", "prometheus-kubernetes.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
    )
    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian's prometheus package (what CI installs) is built without Kubernetes discovery.
        pytest.skip("this promtool has no Kubernetes service discovery (Debian's build)")
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_config_scrapes_the_metrics_port_with_the_service_as_job() -> None:
    # For clusters without the Prometheus Operator: the same jobs as prometheus.yml and the
    # PodMonitors, so alerts.yml (loaded here too) and the dashboards work unchanged.
    config = _yaml("prometheus-kubernetes.yml")
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == ["crossmodal"]
    relabel = job["relabel_configs"]
    keep = {r["source_labels"][0]: r["regex"] for r in relabel if r.get("action") == "keep"}
    assert keep["__meta_kubernetes_pod_container_port_name"] == "metrics"
    assert keep["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] == "true"
    targets = {r["target_label"]: r["source_labels"] for r in relabel if "target_label" in r}
    assert targets["job"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    assert "service" not in targets


def test_promtool_check_rules(require_tool) -> None:
    _promtool(require_tool, "check", "rules", "alerts.yml")


def test_promtool_test_rules(require_tool) -> None:
    _promtool(require_tool, "test", "rules", "alerts_test.yml")


def test_every_service_is_scraped() -> None:
    config = _yaml("prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for spec in SERVICES:
        job = jobs[spec.name]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        # The metrics port: /metrics alone, the one port a network policy opens to Prometheus.
        assert targets == [f"{spec.name}:{spec.metrics_port}"]
        # A target label named "service" would clash with the services' own label.
        assert all("service" not in sc.get("labels", {}) for sc in job["static_configs"])


def test_the_alerts() -> None:
    rules = _rules()
    assert set(rules) == set(ALERTS)
    for name, (severity, duration) in ALERTS.items():
        rule = rules[name]
        assert rule["labels"]["severity"] == severity, name
        assert rule["for"] == duration, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name


def test_error_alert_is_a_ratio_of_5xx() -> None:
    expr = " ".join(_rules()["HighErrorRatio"]["expr"].split())
    assert 'rate(multimodal_requests_total{status=~"5.."}[5m])' in expr
    assert "/ sum by (service) (rate(multimodal_requests_total[5m]))" in expr
    assert expr.endswith("> 0.05")


def test_latency_alert_is_a_p95_per_service() -> None:
    expr = " ".join(_rules()["HighLatencyP95"]["expr"].split())
    assert expr.startswith("histogram_quantile(0.95,")
    assert "sum by (service, le) (rate(multimodal_request_duration_seconds_bucket[5m]))" in expr
    assert expr.endswith("> 2")


def test_every_alert_has_a_firing_and_a_quiet_test_case() -> None:
    cases = [
        check
        for test in _yaml("alerts_test.yml")["tests"]
        for check in test.get("alert_rule_test", [])
    ]
    for name in ALERTS:
        outcomes = {bool(c["exp_alerts"]) for c in cases if c["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: needs a firing and a non-firing case"


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_firing_cases_check_the_annotations(name: str) -> None:
    for test in _yaml("alerts_test.yml")["tests"]:
        for check in test.get("alert_rule_test", []):
            if check["alertname"] == name:
                for alert in check["exp_alerts"]:
                    assert set(alert["exp_annotations"]) == set(_rules()[name]["annotations"])


def test_service_down_watches_the_five_services_alone() -> None:
    # In a cluster's shared Prometheus, a bare `up == 0` would page for every other application.
    expr = _rules()["ServiceDown"]["expr"].strip()
    jobs = "|".join(spec.name for spec in SERVICES)
    assert expr == f'up{{job=~"{jobs}"}} == 0'
