"""deploy/grafana: the provisioning files and the dashboards (overview; model and index)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARDS = {
    "crossmodal-overview": GRAFANA / "dashboards" / "crossmodal-overview.json",
    "crossmodal-model-index": GRAFANA / "dashboards" / "crossmodal-model-index.json",
}
# Grafana's variables, replaced by something PromQL accepts before promtool parses the queries.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$service": ".*",
    "$job": ".*",
    "$collection": ".*",
}


def _dashboard(uid: str = "crossmodal-overview") -> dict[str, Any]:
    return json.loads(DASHBOARDS[uid].read_text(encoding="utf-8"))


def _panels(uid: str = "crossmodal-overview") -> list[dict[str, Any]]:
    panels = []
    for panel in _dashboard(uid)["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows
    return [p for p in panels if p.get("type") != "row"]


def _exprs(uid: str = "crossmodal-overview") -> list[str]:
    return [target["expr"] for panel in _panels(uid) for target in panel.get("targets", [])]


def _flat(expr: str) -> str:
    return " ".join(expr.split())


def test_datasource_is_provisioned() -> None:
    config = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (datasource,) = config["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["isDefault"] is True
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == datasource["uid"]


def test_dashboards_are_provisioned() -> None:
    config = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text()
    )
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    # The provider loads every file of the directory: each one must be a dashboard listed here.
    assert set((GRAFANA / "dashboards").iterdir()) == set(DASHBOARDS.values())


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_dashboard_is_well_formed(uid: str) -> None:
    dashboard = _dashboard(uid)
    assert dashboard["uid"] == uid
    datasource = {v["name"]: v for v in dashboard["templating"]["list"]}["datasource"]
    assert datasource["current"]["value"] == "prometheus"
    panels = _panels(uid)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["title"] and panel["targets"], panel.get("title")
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


@pytest.mark.parametrize(
    ("feature", "pattern"),
    [
        ("request rate by service/endpoint",
         r"sum by \(service, endpoint\) \(rate\(multimodal_requests_total\{"),
        # Over the error counter, whose series start at 0: a healthy service reads 0.
        ("5xx ratio",
         r"sum by \(service\) \(rate\(multimodal_errors_total\{.*\) / sum by \(service\) "
         r"\(rate\(multimodal_requests_total\{"),
        ("p50 latency", r"histogram_quantile\(0\.5, .*multimodal_request_duration_seconds_bucket"),
        ("p95 latency", r"histogram_quantile\(0\.95, .*multimodal_request_duration_seconds_bucket"),
        ("p99 latency", r"histogram_quantile\(0\.99, .*multimodal_request_duration_seconds_bucket"),
        ("model inference", r"^multimodal_model_inference_ms$"),
        ("inference per input",
         r"histogram_quantile\(0\.95, .*feature_input_inference_seconds_bucket"),
        ("search stages", r"histogram_quantile\(0\.95, sum by \(stage, le\) .*"
         r"gateway_search_stage_seconds_bucket"),
        ("cache hit ratio", r"^multimodal_cache_hit_ratio$"),
        ("vectors per collection", r"^sum by \(collection\) \(retrieval_vectors\)$"),
        ("up", r"^up\{"),
    ],
)  # fmt: skip
def test_dashboard_shows(feature: str, pattern: str) -> None:
    assert any(re.search(pattern, _flat(expr)) for expr in _exprs()), feature


@pytest.mark.parametrize(
    ("feature", "pattern"),
    [
        ("inference per input", r"histogram_quantile\(0\.95, sum by \(modality, le\) "
         r"\(rate\(feature_input_inference_seconds_bucket"),
        ("batch size", r"rate\(feature_batch_size_sum\[.*/ .*rate\(feature_batch_size_count"),
        ("queue depth", r"\(feature_queue_depth\)"),
        ("vectors per collection", r"sum by \(collection, modality\) \(retrieval_vectors\{"),
        ("snapshot age", r"retrieval_snapshot_age_seconds\{"),
        ("WAL size", r"retrieval_wal_bytes\{"),
        ("rebuilds", r"increase\(retrieval_index_build_seconds_count\["),
        ("rebuilding now", r"retrieval_index_rebuilding\{"),
    ],
)  # fmt: skip
def test_model_and_index_dashboard_shows(feature: str, pattern: str) -> None:
    exprs = _exprs("crossmodal-model-index")
    assert any(re.search(pattern, _flat(expr)) for expr in exprs), feature


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_dashboard_queries_are_valid_promql(require_tool, tmp_path: Path, uid: str) -> None:
    # promtool parses rule expressions, so the queries go into a throwaway rules file.
    rules = []
    for index, expr in enumerate(_exprs(uid)):
        for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
