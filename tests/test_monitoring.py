"""What operators look at, proven against the real thing: the Grafana dashboard's PromQL, the
alert rules and the scrape configuration, checked with promtool and run by a real Prometheus
server (Debian's ``prometheus`` package) that scrapes a running ``amid run`` on the simulator."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from amid_procs import Daemon, Proc, daemon, poll, simulator
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "amid.json"
ALERTS = DEPLOY / "prometheus" / "amid-alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "amid-alerts.test.yml"
SCRAPE = DEPLOY / "prometheus" / "scrape.yml"

# What Grafana puts in for its variables when every server and sink is selected. Grafana's
# $__rate_interval is at least four scrape intervals; the test scrapes every second.
GRAFANA_VARIABLES = {"__rate_interval": "10s", "__interval": "2s", "__range": "1m",
                     "instance": ".*", "server": ".*", "sink": ".*"}


def require(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/bin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing (Debian package 'prometheus')")
        pytest.skip(f"{tool} not installed (Debian package 'prometheus')")
    return path


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kwargs)


# -- the dashboard's expressions ----------------------------------------------------------------

def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # collapsed rows keep theirs inside


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title and refId, PromQL with Grafana's variables) of every panel target."""
    return [(f"{panel['title']} {target['refId']}", target["expr"])
            for panel in all_panels(load_dashboard()["panels"]) for target in panel.get("targets", [])]


def variable_selectors() -> list[tuple[str, str]]:
    """The series selector inside each query variable's ``label_values(selector, label)``."""
    out = []
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["query"]["query"])
            assert found, variable["query"]
            out.append((f"variable {variable['name']}", found.group(1)))
    return out


def as_promql(expr: str) -> str:
    """Grafana's variables replaced as Grafana does with "All" selected."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr}"
        return GRAFANA_VARIABLES[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


_NOT_METRICS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, labels or keywords)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)          # strings
    text = re.sub(r"\{[^}]*\}", " ", text)                       # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                      # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for token in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        if token.group(2) is None and token.group(1) not in _NOT_METRICS:
            names.add(token.group(1))
    return names


def test_metric_names_are_read_from_promql() -> None:
    assert metric_names('histogram_quantile(0.5, sum by (instance, le) (rate(a_bucket{x=~"$s"}[5m])))') == {"a_bucket"}
    assert metric_names("time() - b and on(job, instance) c > 0") == {"b", "c"}


def test_dashboard_is_current_grafana_schema_with_variables() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "amid"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("server", "sink"):
        assert variables[name]["type"] == "query"
        assert variables[name]["multi"] and variables[name]["includeAll"]
    panels = list(all_panels(dashboard["panels"]))
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        # Every query goes to the data source the operator picked, never a fixed one.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    expressions = " ".join(expr for _, expr in dashboard_expressions())
    for variable in ("$server", "$sink"):
        assert variable in expressions
    titles = {panel["title"] for panel in panels}
    assert {"AMI connection state", "Reconnects and disconnects", "Events/s in per server",
            "Events/s in and out per sink", "Drops by reason", "Queue fill", "Spool fill",
            "Delivery latency", "Ping round-trip", "Last event age", "Config reloads"} <= titles


def test_promtool_accepts_every_dashboard_expression(tmp_path: Path) -> None:
    promtool = require("promtool")
    expressions = dashboard_expressions() + variable_selectors()
    rules = {"groups": [{"name": "amid-dashboard", "rules": [
        {"record": f"amid_dashboard:expression_{number}", "expr": as_promql(expr)}
        for number, (_, expr) in enumerate(expressions)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = run([promtool, "check", "rules", str(path)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in checked.stdout


# -- alert rules and the scrape configuration ---------------------------------------------------

def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = require("promtool")
    checked = run([promtool, "check", "rules", str(ALERTS)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run([promtool, "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_runbook_and_tests_that_fire_and_stay_quiet() -> None:
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    alerts = {rule["alert"] for rule in rules}
    # The list: AMI down, connected but silent, dropping, retrying, spool, reload, restarts.
    assert {"AmidAMIDown", "AmidAMINoEvents", "AmidSinkDroppingEvents", "AmidSinkRetrying",
            "AmidSpoolAlmostFull", "AmidConfigReloadFailed", "AmidRestarting"} <= alerts
    for rule in rules:
        assert {"summary", "description", "command"} <= set(rule["annotations"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
            # Each group also holds healthy series the expected alerts leave out (the quiet ones).
            if case["exp_alerts"]:
                series = {s["series"] for s in test["input_series"]}
                firing = {tuple(sorted(a["exp_labels"].items())) for a in case["exp_alerts"]}
                assert len(series) > len(firing), test["name"]
    assert fires == quiet == alerts


def test_scrape_config_passes_promtool(tmp_path: Path) -> None:
    promtool = require("promtool")
    checked = run([promtool, "check", "config", str(SCRAPE)])
    if checked.returncode != 0 and "field kubernetes_sd_configs not found" in checked.stdout + checked.stderr:
        # Debian builds Prometheus without Kubernetes discovery: check everything else of the file
        # (the pod-annotation relabelling included) with a file discovery in its place. The
        # relabelling is also run by a real Prometheus below.
        (tmp_path / "amid-alerts.yml").write_text(ALERTS.read_text())
        config = yaml.safe_load(SCRAPE.read_text())
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["file_sd_configs"] = [{"files": [str(tmp_path / "pods.json")]}]
        path = tmp_path / "scrape.yml"
        path.write_text(yaml.safe_dump(config))
        checked = run([promtool, "check", "config", str(path)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


# -- a real Prometheus scraping a real amid ------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Stack:
    amid: Daemon
    prometheus: Proc
    url: str

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/api/v1/query", query=expr)["result"]
        return result


def prometheus_config(tmp_path: Path, amid_port: int) -> Path:
    """scrape.yml as shipped, pointed at the test's amid, scraping every second. The pod job
    finds its targets in a file carrying the labels Kubernetes discovery would set: one pod
    annotated with amid's port (its address has another port, as a pod's does), one not."""
    config = yaml.safe_load(SCRAPE.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    pods = tmp_path / "pods.json"
    pods.write_text(json.dumps([
        {"targets": ["127.0.0.1:1"], "labels": {
            "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
            "__meta_kubernetes_pod_annotation_prometheus_io_port": str(amid_port),
            "__meta_kubernetes_namespace": "telephony", "__meta_kubernetes_pod_name": "amid-0"}},
        {"targets": ["127.0.0.1:2"], "labels": {"__meta_kubernetes_pod_name": "not-annotated"}},
    ]))
    for job in config["scrape_configs"]:
        if "static_configs" in job:
            job["static_configs"][0]["targets"] = [f"127.0.0.1:{amid_port}"]
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["file_sd_configs"] = [{"files": [str(pods)], "refresh_interval": "1s"}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = require("prometheus")
    tmp_path = tmp_path_factory.mktemp("monitoring")
    with simulator(tmp_path, call_rate=20) as sim, daemon(tmp_path, sim.port) as amid:
        port = free_port()
        proc = Proc([prometheus, f"--config.file={prometheus_config(tmp_path, amid.port)}",
                     f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
                     "--log.level=warn"], tmp_path / "prometheus.log")
        try:
            result = Stack(amid, proc, f"http://127.0.0.1:{port}")

            def ready() -> bool:
                try:
                    with urllib.request.urlopen(f"{result.url}/-/ready", timeout=2) as response:
                        return response.status == 200
                except OSError:
                    if proc.popen.poll() is not None:
                        raise AssertionError(f"prometheus exited:\n{proc.output()}") from None
                    return False
            poll(ready, 30, "Prometheus to be ready")
            yield result
        finally:
            proc.stop()


def exported_names(text: str) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.mark.slow
def test_every_dashboard_expression_returns_data_from_a_real_prometheus(stack: Stack) -> None:
    expressions = [(title, as_promql(expr)) for title, expr in dashboard_expressions() + variable_selectors()]
    exported = exported_names(stack.amid.metrics())
    for title, expr in expressions:
        assert metric_names(expr) and metric_names(expr) <= exported, (title, metric_names(expr) - exported)

    def every_expression_has_data() -> bool:
        empty = [title for title, expr in expressions if not stack.query(expr)]
        every_expression_has_data.empty = empty  # type: ignore[attr-defined]
        return not empty
    every_expression_has_data.empty = []  # type: ignore[attr-defined]
    try:
        poll(every_expression_has_data, 60, "every dashboard expression to return data", interval=1.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still empty: {every_expression_has_data.empty}") from None  # type: ignore[attr-defined]

    # The numbers are amid's: events per second near the simulator's pace, latencies below a minute.
    quantiles = stack.query(as_promql(
        "histogram_quantile(0.99, sum by (sink, le) "
        "(rate(amid_sink_delivery_latency_seconds_bucket[$__rate_interval])))"))
    assert all(0 < float(series["value"][1]) < 60 for series in quantiles), quantiles


@pytest.mark.slow
def test_alert_rules_load_and_evaluate_on_a_real_prometheus(stack: Stack) -> None:
    exported = exported_names(stack.amid.metrics())
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    for rule in rules:
        assert metric_names(rule["expr"]) <= exported, (rule["alert"], metric_names(rule["expr"]) - exported)

    def evaluated() -> list[dict[str, Any]] | None:
        loaded = [r for g in stack.get("/api/v1/rules")["groups"] for r in g["rules"]]
        return loaded if len(loaded) == len(rules) and all(r["lastEvaluation"] > "2000" for r in loaded) else None
    loaded = poll(evaluated, 30, "the alert rules to be evaluated", interval=0.5)
    assert {r["name"]: r["health"] for r in loaded} == {rule["alert"]: "ok" for rule in rules}
    # A healthy amid fires nothing (pending alerts would show here too).
    assert stack.get("/api/v1/alerts")["alerts"] == []


@pytest.mark.slow
def test_pod_annotation_relabelling_finds_amid(stack: Stack) -> None:
    def scraped() -> list[dict[str, Any]] | None:
        targets = [t for t in stack.get("/api/v1/targets")["activeTargets"] if t["labels"]["job"] == "amid-pods"]
        return targets if targets and all(t["health"] == "up" for t in targets) else None
    targets = poll(scraped, 30, "the annotated pod to be scraped", interval=0.5)
    assert [(t["labels"]["instance"], t["labels"]["namespace"], t["labels"]["pod"]) for t in targets] == [
        (f"127.0.0.1:{stack.amid.port}", "telephony", "amid-0")]  # the pod without annotation: dropped
    assert stack.query('amid_ami_up{job="amid-pods", pod="amid-0"} == 1')
