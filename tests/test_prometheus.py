"""The alert rules and the Grafana dashboard that ship in config/: valid, unit-tested, and naming only real metrics.

promtool (Debian's ``prometheus`` package; ``.ci/run`` installs it) checks the rules and the example Prometheus
configuration, runs the rules' unit tests (config/prometheus/graphsync.rules.test.yml) and parses every dashboard
expression. A running daemon's ``/metrics`` then proves that each metric the rules and the dashboard name exists,
so a renamed metric breaks this test instead of silently emptying a panel or muting an alert.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT
from tests.fakes.azurite import free_port
from tests.fakes.graph import populate

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import StartGraphsync, WriteConfig
    from tests.fakes.graph import FakeGraph

PROMETHEUS_DIR = REPO_ROOT / "config" / "prometheus"
RULES = PROMETHEUS_DIR / "graphsync.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "graphsync.rules.test.yml"
EXAMPLE_CONFIG = PROMETHEUS_DIR / "prometheus.example.yml"
DASHBOARD = REPO_ROOT / "config" / "grafana" / "graphsync.dashboard.json"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed: install Debian's prometheus package "
    "(apt-get install --no-install-recommends prometheus), as .ci/run does in CI",
)

# Series that Prometheus records itself for every scrape target, never found in an exporter's /metrics.
PROMETHEUS_OWN_SERIES = frozenset({"up"})
# -- reading PromQL --------------------------------------------------------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])([A-Za-z_:][\w:]*)\b(?!\s*\()")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: what is left once strings, label matchers, ranges, label lists,
    function calls and keywords are taken out. Enough for the expressions we ship; not a PromQL parser."""
    for pattern in (_STRINGS, _LABEL_MATCHERS, _RANGES, _LABEL_LISTS):
        expr = pattern.sub(" ", expr)
    return {name for name in _IDENTIFIER.findall(expr) if name.lower() not in _KEYWORDS}


def test_metric_names_are_read_from_selectors_not_from_functions_labels_or_strings() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, job) (rate(a_bucket{job=~"$job", x="b_total"}[$__rate_interval])))'
        " / on (job) group_left (tenant) max without (instance) (c:d:max offset 5m) > bool 2 unless up == 0"
    )
    assert metric_names(expr) == {"a_bucket", "c:d:max", "up"}


# -- the files -------------------------------------------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _dashboard_panels() -> list[dict[str, Any]]:
    return [panel for panel in json.loads(DASHBOARD.read_text())["panels"] if panel["type"] != "row"]


def _dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in _dashboard_panels() for target in panel["targets"]]


def test_every_alert_has_a_severity_an_explanation_and_unit_tests_that_fire_it_and_keep_it_silent() -> None:
    alerts = [rule for rule in _rules() if "alert" in rule]
    tests = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for alert in alerts:
        name = alert["alert"]
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), name
        assert {"summary", "description"} <= alert["annotations"].keys(), name
        cases = [case for case in tests if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in cases), f"no unit test where {name} fires"
        assert any(not case["exp_alerts"] for case in cases), f"no unit test where {name} stays silent"


def test_the_dashboard_has_a_titled_panel_with_a_query_for_each_subject() -> None:
    panels = _dashboard_panels()
    assert len({panel["id"] for panel in panels}) == len(panels), "panel ids must be unique"
    assert all(panel["title"] and panel["targets"] and panel["gridPos"] for panel in panels)
    used = set().union(*(metric_names(expr) for expr in _dashboard_expressions()))
    assert {
        "graphsync_job_last_success_timestamp_seconds",
        "graphsync_job_runs_total",
        "graphsync_job_run_duration_seconds_bucket",
        "graphsync_objects_synced_total",
        "graphsync_token_acquisitions_total",
        "graphsync_identity_provider_requests_total",
        "graphsync_storage_operations_total",
        "graphsync_graph_throttled_retries_total",
        "graphsync_reconcile_drift_objects",
        "graphsync_reconcile_last_timestamp_seconds",
        "graphsync_table_commits_total",
        "graphsync_table_conflicts_retried_total",
        "graphsync_table_bytes_written_total",
    } <= used


# -- promtool --------------------------------------------------------------------------------------------------


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.integration
@needs_promtool
def test_promtool_accepts_the_rules_and_the_example_prometheus_configuration() -> None:
    for args in (("check", "rules", RULES.name), ("check", "config", EXAMPLE_CONFIG.name)):
        result = _promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
@needs_promtool
def test_every_alert_passes_its_promtool_unit_tests() -> None:
    result = _promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
@needs_promtool
def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    """Each panel query becomes a recording rule, which ``check rules`` parses; Grafana's interval variable is
    given a value first (the $tenant / $job ones sit inside strings and are valid as they are)."""
    rules = [
        {"record": f"dashboard:expression_{index}", "expr": expr.replace("$__rate_interval", "5m")}
        for index, expr in enumerate(_dashboard_expressions())
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- against a running daemon ----------------------------------------------------------------------------------


def exported_names(exposition: str) -> set[str]:
    """Sample names each metric family of a ``/metrics`` page can have, with or without samples yet."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    return {
        family.name + suffix
        for family in text_string_to_metric_families(exposition)
        for suffix in suffixes.get(family.type, ("",))
    }


# An hourly job runs within ~5 s of the daemon's start, unless the next slot is under a minute away: then it waits
# for that slot plus its jitter (at most 30 s). Wait for the worst case, or a start just before the hour fails.
FIRST_RUN_WITHIN_SECONDS = 60 + 30 + 30


def _scrape_after_first_runs(url: str, timeout: float = FIRST_RUN_WITHIN_SECONDS, marker: str = 'result="ok"') -> str:
    """The daemon's /metrics once ``marker`` is on it (by default, once something succeeded): the page of a daemon
    at work, not of one still starting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                page = response.read().decode()
        except OSError:
            page = ""
        if marker in page:
            return page
        time.sleep(0.2)
    pytest.fail(f"no successful job run in {url} within {timeout:.0f} s")


def test_every_metric_the_rules_and_the_dashboard_use_is_exported_by_a_running_daemon(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, start_graphsync: StartGraphsync, tmp_path: Path
) -> None:
    tenant = "contoso.onmicrosoft.com"
    populate(fake_graph, tenant, users=20, groups=2)
    port, endpoint = free_port(), free_port()
    config = graphsync_config(
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(tmp_path / "out"), "tables": True},
            "jobs": [{"name": "users", "resource": "users", "delta": True, "select": ["displayName"], "every": "1h"}],
            "metrics": {"port": port},
            # on, so the metrics of change notifications are exported as a daemon that uses them exports them
            "notifications": {
                "notification_url": f"http://127.0.0.1:{endpoint}/graph/notifications",
                "host": "127.0.0.1",
                "port": endpoint,
            },
        }
    )
    start_graphsync("run", "--config", str(config))
    # the history table is the last a users round commits to
    page = _scrape_after_first_runs(
        f"http://127.0.0.1:{port}/metrics", marker='graphsync_table_commits_total{table="users_history"}'
    )
    exported = exported_names(page)
    samples = {
        (sample.name, sample.labels.get("table")): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }
    for table in ("users", "users_history"):  # the first run created and filled both tables
        assert samples[("graphsync_table_commits_total", table)] >= 1, table
        assert samples[("graphsync_table_bytes_written_total", table)] > 0, table

    expressions = [str(rule["expr"]) for rule in _rules()] + _dashboard_expressions()
    used = set().union(*(metric_names(expr) for expr in expressions))
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    missing = used - exported - recorded - PROMETHEUS_OWN_SERIES
    assert not missing, f"the rules or the dashboard use metrics the daemon does not export: {sorted(missing)}"
