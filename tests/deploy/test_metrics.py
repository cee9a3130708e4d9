"""Every metric that the dashboard or an alert queries is defined in the services' code, so a
renamed metric cannot leave a panel or an alert silently empty."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("shared", "services", "crossmodal")
# Series that Prometheus itself produces for every target.
BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan"}  # fmt: skip
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (a lexer, not a parser: enough for our queries)."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group(0)
        if expr[match.end() :].lstrip().startswith("(") or word.lower() in KEYWORDS:
            continue  # a function or an operator
        names.add(word)
    return names


@cache
def _code() -> str:
    return "\n".join(
        path.read_text(encoding="utf-8", errors="ignore")
        for directory in CODE_DIRS
        for path in sorted((ROOT / directory).rglob("*.py"))
    )


def defined_in_code(metric: str) -> bool:
    candidates = {metric} | {metric.removesuffix(s) for s in SUFFIXES if metric.endswith(s)}
    code = _code()
    return any(f'"{name}"' in code or f"'{name}'" in code for name in candidates)


def _queries() -> list[tuple[str, str]]:
    dashboard = json.loads(
        (ROOT / "deploy/grafana/dashboards/crossmodal-overview.json").read_text(encoding="utf-8")
    )
    queries = [
        (f"dashboard panel {panel['title']!r}", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
            queries.append((f"dashboard variable {variable['name']}", inner.group(1)))
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text(encoding="utf-8"))
    queries += [
        (f"alert {rule['alert']}", rule["expr"])
        for group in alerts["groups"]
        for rule in group["rules"]
    ]
    return queries


def _used_metrics() -> dict[str, list[str]]:
    used: dict[str, list[str]] = {}
    for where, expr in _queries():
        for name in metric_names(expr) - BUILTIN:
            used.setdefault(name, []).append(where)
    return used


USED = _used_metrics()


def test_metric_names_lexer() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (service, le) (rate(a_bucket{service=~"$service"}'
        "[$__rate_interval])))"
    ) == {"a_bucket"}
    assert metric_names('sum(rate(b_total{status=~"5.."}[5m])) by (x) / on(x) c > 0.05') == {
        "b_total",
        "c",
    }
    assert metric_names("up == 0") == {"up"}


def test_the_expected_metrics_are_queried() -> None:
    assert {
        "multimodal_requests_total",
        "multimodal_errors_total",
        "multimodal_request_duration_seconds_bucket",
        "multimodal_model_inference_ms",
        "feature_input_inference_seconds_bucket",
        "gateway_search_stage_seconds_bucket",
        "multimodal_cache_hit_ratio",
        "retrieval_vectors",
    } <= set(USED)


@pytest.mark.parametrize("metric", sorted(USED))
def test_metric_is_defined_in_the_code(metric: str) -> None:
    assert defined_in_code(metric), (
        f"{metric} (used by {', '.join(sorted(set(USED[metric])))}) is not defined in "
        f"{', '.join(CODE_DIRS)}: rename the query or export the metric"
    )
