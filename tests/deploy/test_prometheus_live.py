"""A real Prometheus (Debian's package) scraping a running stack with the project's own scrape
jobs and alert rules, after traffic with 4xx answers and an induced 5xx: every target is up,
every series the rules and dashboards read exists, every alert expression evaluates, every
dashboard query (variables substituted as Grafana does) returns data, and a stopped service
makes ServiceDown pending.

Every wait polls Prometheus until its condition holds or a generous deadline passes, so a slow
machine changes only how long the test takes.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from crossmodal.demo.shapes import demo_collection
from crossmodal.stack import SERVICES, LocalStack
from tests.deploy.test_grafana import DASHBOARDS, GRAFANA_VARIABLES
from tests.integration.support import (
    add_item,
    free_ports,
    gateway_client,
    get_token,
    png_bytes,
    running_stack,
)

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
COLLECTION = "monitored"
DEADLINE_SECONDS = 120.0
# Metric names the rules and dashboards read: Prometheus' own `up` and the services' families.
METRIC_NAME = re.compile(r"\b(?:up|(?:multimodal|feature|retrieval|gateway|auth|metadata)_\w+)\b")


@dataclass
class Monitored:
    stack: LocalStack
    prometheus: httpx.Client
    gateway: httpx.Client
    auth: dict[str, str]

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = self.prometheus.get("/api/v1/query", params={"query": expr})
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]


def _poll(check: Callable[[], tuple[bool, Any]], what: str) -> Any:
    """Calls ``check()`` until it answers ``(True, detail)`` and returns that detail; fails with
    ``what`` and the last detail at the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        done, detail = check()
        if done:
            return detail
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {DEADLINE_SECONDS:.0f} s (last: {detail!r})")
        time.sleep(0.5)


def _prometheus_config(stack: LocalStack, port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with its targets on this stack's loopback ports, scraped
    and evaluated every second."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"prometheus"} | {spec.name for spec in SERVICES}
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    for spec in SERVICES:
        jobs[spec.name]["static_configs"] = [{"targets": [urlsplit(stack.url(spec.name)).netloc]}]
    config["global"] |= {"scrape_interval": "1s", "scrape_timeout": "1s"}
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    return config


def _drive_traffic(gateway: httpx.Client, auth: dict[str, str], part: int) -> None:
    """Writes (so snapshots and the log move), distinct and repeated text and image searches,
    and answers the client gets wrong (401, 404, 422). Each ``part`` writes other shapes and
    sends other distinct queries."""
    shapes = demo_collection()[4 * part : 4 * part + 4]
    for demo in shapes:
        add_item(
            gateway, auth, png_bytes(demo.image), collection=COLLECTION, captions=demo.captions
        )
    for round_ in range(3):
        for demo in shapes:
            body = {"query": demo.captions[0], "top_k": 3, "collection": COLLECTION}
            assert gateway.post("/search/text", json=body, headers=auth).status_code == 200
            distinct = {**body, "query": f"{demo.captions[0]} number {part}.{round_}"}
            assert gateway.post("/search/text", json=distinct, headers=auth).status_code == 200
            image = gateway.post(
                "/search/image",
                files={"image": ("query.png", png_bytes(demo.image), "image/png")},
                data={"top_k": "3", "collection": COLLECTION},
                headers=auth,
            )
            assert image.status_code == 200, image.text
    assert gateway.post("/search/text", json={"query": "a circle"}).status_code == 401
    missing = {"query": "a circle", "collection": "no-such-collection"}
    assert gateway.post("/search/text", json=missing, headers=auth).status_code == 404
    assert gateway.post("/search/text", json={"query": ""}, headers=auth).status_code == 422


@pytest.fixture(scope="module")
def monitored(
    require_tool, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Monitored]:
    prometheus_bin = require_tool("prometheus")
    work = tmp_path_factory.mktemp("monitored")
    # A snapshot every few writes, so the snapshot panels have something to show.
    extra_env = {"RETRIEVAL_SNAPSHOT_EVERY": "3"}
    with running_stack(work / "stack", demo_model_dir, extra_env=extra_env) as stack:
        (port,) = free_ports(1)
        config_path = work / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(_prometheus_config(stack, port)), encoding="utf-8")
        log = (work / "prometheus.log").open("wb")
        process = subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            with (
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as prometheus,
                gateway_client(stack) as gateway,
            ):

                def ready() -> tuple[bool, str]:
                    assert process.poll() is None, (work / "prometheus.log").read_text()
                    try:
                        return prometheus.get("/-/ready").status_code == 200, "not ready"
                    except httpx.TransportError as exc:
                        return False, repr(exc)

                _poll(ready, "Prometheus ready")
                monitored = Monitored(stack, prometheus, gateway, {})
                # Scraped once before the traffic: a counter first seen with its final value has
                # no increase, and a rate over it is 0 (a quantile over it NaN).
                _poll(lambda: _all_up(monitored), "up == 1 for every job before the traffic")
                auth = {"Authorization": f"Bearer {get_token(gateway)}"}
                _drive_traffic(gateway, auth, part=0)
                # Again once every target was scraped after it: a series the first part created
                # (a label value seen for the first time) then has an increase for rate() to see.
                scraped_after = time.time()
                _poll(lambda: _scraped_since(monitored, scraped_after), "a scrape of every target")
                _drive_traffic(gateway, auth, part=1)
                yield Monitored(stack, prometheus, gateway, auth)
        finally:
            process.terminate()
            process.wait(30)
            log.close()


def _all_up(monitored: Monitored) -> tuple[bool, set[str]]:
    jobs = {"prometheus"} | {spec.name for spec in SERVICES}
    up = {series["metric"]["job"] for series in monitored.query("up == 1")}
    return up == jobs, up


def _scraped_since(monitored: Monitored, moment: float) -> tuple[bool, list[float]]:
    """Whether every target's last scrape started after ``moment`` (a Unix time)."""
    stamps = _values(monitored.query("timestamp(up)"))
    return len(stamps) == 1 + len(SERVICES) and min(stamps) > moment, stamps


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _substituted(expr: str) -> str:
    """The query Grafana sends: every variable replaced (multi-value "All" by its allValue)."""
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def _dashboard_panels() -> list[tuple[str, dict[str, Any]]]:
    panels = []
    for uid, path in DASHBOARDS.items():
        for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]:
            for inner in [panel, *panel.get("panels", [])]:
                if inner.get("type") != "row":
                    panels.append((uid, inner))
    return panels


def _template_queries() -> list[tuple[str, str, str]]:
    """(dashboard, metric, label) of every ``label_values(metric, label)`` variable."""
    found = []
    for uid, path in DASHBOARDS.items():
        for variable in json.loads(path.read_text(encoding="utf-8"))["templating"]["list"]:
            if variable["type"] == "query":
                match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
                assert match, variable["definition"]
                found.append((uid, match[1], match[2]))
    return found


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [float(series["value"][1]) for series in result]


# The order is the tests' order: the last one stops a service.


def test_every_target_is_up(monitored: Monitored) -> None:
    _poll(lambda: _all_up(monitored), "up == 1 for every job")


def test_every_series_the_rules_and_dashboards_read_exists(monitored: Monitored) -> None:
    exprs = [rule["expr"] for rule in _rules()]
    exprs += [t["expr"] for _, panel in _dashboard_panels() for t in panel["targets"]]
    names = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    # Names a histogram exposes only with a suffix, read as such by the queries.
    assert "feature_input_inference_seconds_bucket" in names

    def missing() -> tuple[bool, list[str]]:
        absent = [name for name in sorted(names) if not monitored.query(f"count({name})")]
        return not absent, absent

    _poll(missing, "series the rules and dashboards read")


def test_every_alert_expression_evaluates(monitored: Monitored) -> None:
    for rule in _rules():
        monitored.query(rule["expr"])  # fails on a query error

    def evaluated() -> tuple[bool, dict[str, str]]:
        body = monitored.prometheus.get("/api/v1/rules").json()
        health = {
            rule["name"]: rule["health"]
            for group in body["data"]["groups"]
            for rule in group["rules"]
        }
        names = {rule["alert"] for rule in _rules()}
        return set(health) == names and "unknown" not in health.values(), health

    health = _poll(evaluated, "every alert rule evaluated")
    assert all(value == "ok" for value in health.values()), health


def test_every_dashboard_variable_has_values(monitored: Monitored) -> None:
    for uid, metric, label in _template_queries():

        def values(metric: str = metric, label: str = label) -> tuple[bool, list[str]]:
            response = monitored.prometheus.get(
                f"/api/v1/label/{label}/values", params={"match[]": metric}
            )
            found = response.json()["data"]
            return bool(found), found

        _poll(values, f"{uid}: label_values({metric}, {label})")


@pytest.mark.parametrize(
    ("uid", "panel"),
    _dashboard_panels(),
    ids=[f"{uid}:{panel['title']}" for uid, panel in _dashboard_panels()],
)
def test_every_dashboard_panel_has_data(
    monitored: Monitored, uid: str, panel: dict[str, Any]
) -> None:
    """Every query of the panel returns series, and at least one of its values is a number
    (a quantile over no observations is NaN: Grafana draws nothing)."""
    exprs = [_substituted(target["expr"]) for target in panel["targets"]]

    def data() -> tuple[bool, dict[str, list[float]]]:
        results = {expr: _values(monitored.query(expr)) for expr in exprs}
        finite = any(math.isfinite(v) for values in results.values() for v in values)
        return all(results.values()) and finite, results

    _poll(data, f"{uid}: panel {panel['title']!r}")


def test_an_induced_5xx_is_counted_and_a_stopped_service_makes_service_down_pending(
    monitored: Monitored,
) -> None:
    monitored.stack.services["feature"].stop()
    body = {"query": "a service that is gone", "collection": COLLECTION}
    response = monitored.gateway.post("/search/text", json=body, headers=monitored.auth)
    assert response.status_code == 503, response.text

    def gateway_errors() -> tuple[bool, float]:
        result = monitored.query(
            'sum(multimodal_errors_total{service="gateway", error_type="http_503"})'
        )
        total = sum(_values(result))
        return total >= 1, total

    _poll(gateway_errors, "the gateway's 503 in multimodal_errors_total")

    def service_down() -> tuple[bool, list[str]]:
        alerts = monitored.prometheus.get("/api/v1/alerts").json()["data"]["alerts"]
        states = [
            alert["state"]
            for alert in alerts
            if alert["labels"]["alertname"] == "ServiceDown" and alert["labels"]["job"] == "feature"
        ]
        return bool(states), states

    states = _poll(service_down, "ServiceDown for the stopped feature service")
    # `for: 1m`: pending first; firing only if this machine took a minute to get here.
    assert set(states) <= {"pending", "firing"}, states
    others = monitored.query('up{job!="feature"} == 0')
    assert not others, others
