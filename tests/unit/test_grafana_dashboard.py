"""deploy/grafana/drover.json: an importable dashboard whose every query is valid PromQL and
reads drover's own series; the names it reads are checked against a live scrape in
tests/lab/test_metrics_prometheus.py, with the extractor tested here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.promql_names import dashboard_exprs, exposed_names, metric_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "drover.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# What Grafana puts in place of its variables, enough for promtool to parse a query.
GRAFANA_VALUES = {"$__rate_interval": "1m", "$job": ".*", "$domain": ".*", "$host": ".*"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_is_current_and_takes_its_prometheus_as_a_variable(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("host", "job", "domain"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DATASOURCE
    for panel in panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_has_the_three_views(dashboard: dict[str, Any]) -> None:
    """Fleet overview, per-migration progress (remaining bytes; dirty against transfer rate,
    by job and domain), per-host slots against limits and free memory."""
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert [r.split(" (")[0] for r in rows] == ["Fleet overview", "Migration progress", "Hosts"]
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels(dashboard)}
    assert "drover_migration_data_remaining_bytes{" in by_title["Remaining bytes"]
    dirty = by_title["Dirty rate vs transfer rate"]
    assert "drover_migration_dirty_rate_bytes_per_second" in dirty
    assert "drover_migration_transfer_rate_bytes_per_second" in dirty
    assert 'job=~"$job"' in dirty and 'domain=~"$domain"' in dirty
    slots = by_title["Slots held vs limit"]
    assert "drover_host_slots_held" in slots and "drover_host_slots_limit" in slots
    assert "drover_host_free_memory_bytes" in by_title["Free memory for guests"]
    fleet = " ".join(by_title.values())
    for name in ("drover_jobs", "drover_jobs_waiting", "drover_evacuations"):
        assert re.search(rf"\b{name}\b", fleet), name
    assert "drover_workers_alive" in by_title["Workers alive"]
    assert "rate(drover_migrations_total[" in by_title["Migrations per second by outcome"]


def test_every_query_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Each query, variables filled in as Grafana would, loaded by promtool as a rule."""
    rules = []
    for i, expr in enumerate(dashboard_exprs(dashboard)):
        selector = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr)
        for variable, value in GRAFANA_VALUES.items():
            selector = selector.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": selector})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool = shutil.which("promtool")
    assert promtool, "Debian's prometheus package is needed for promtool (make deps installs it)"
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_query_reads_drover_series(dashboard: dict[str, Any]) -> None:
    for expr in dashboard_exprs(dashboard):
        names = metric_names(expr)
        assert names, expr
        assert all(n.startswith("drover_") for n in names), (expr, names)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'drover_migration_data_remaining_bytes{job=~"$job", domain=~"$domain"}',
            {"drover_migration_data_remaining_bytes"},
        ),
        (
            "histogram_quantile(0.95, sum by (le, mode) "
            "(rate(drover_migration_duration_seconds_bucket[$__rate_interval])))",
            {"drover_migration_duration_seconds_bucket"},
        ),
        (
            'drover_host_slots_held{direction="out"} > 0 unless on (host) label_replace('
            'max by (src) (drover_migration_data_remaining_bytes), "host", "$1", "src", "(.+)")',
            {"drover_host_slots_held", "drover_migration_data_remaining_bytes"},
        ),
        (
            "time() - drover_migration_last_progress_timestamp_seconds > 120 or up == 0",
            {"drover_migration_last_progress_timestamp_seconds", "up"},
        ),
        (
            "max(x offset 15m) or max(y) * 0 > bool sum(z) by (host)"
            " and a ignoring(b) group_left() c",
            {"x", "y", "z", "a", "c"},
        ),
        (
            'label_values(drover_migration_data_remaining_bytes{job=~"$job"}, domain)',
            {"drover_migration_data_remaining_bytes"},
        ),
        ("absent(drover_exporter_active == 1)", {"drover_exporter_active"}),
    ],
)
def test_metric_names_finds_the_series_and_nothing_else(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_alert_rules_read_drover_series_and_up() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    names = set().union(*(metric_names(r["expr"]) for g in groups for r in g["rules"]))
    assert "up" in names
    assert all(n.startswith("drover_") for n in names - {"up"}), names


def test_exposed_names_follow_each_family_type() -> None:
    text = "\n".join(
        [
            "# HELP drover_migrations_total Migrations ended.",
            "# TYPE drover_migrations_total counter",
            "# HELP drover_migration_duration_seconds Duration.",
            "# TYPE drover_migration_duration_seconds histogram",
            "# HELP drover_worker_up Up.",
            "# TYPE drover_worker_up gauge",
            'drover_worker_up{host="lab1"} 1.0',
            "",
        ]
    )
    assert exposed_names(text) == {
        "drover_migrations_total",
        "drover_migration_duration_seconds_bucket",
        "drover_migration_duration_seconds_sum",
        "drover_migration_duration_seconds_count",
        "drover_worker_up",
    }
