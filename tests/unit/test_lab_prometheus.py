"""lab/prometheus.py: the lab's copy of the rules, its config, and a real Prometheus run.

No lab needed: the server (Debian's prometheus, as any user) scrapes an exporter served by
this test process (prometheus_client, as drover's own exporters are) and a target where
nothing listens, a worker that is down. That proves what the lab test builds on: the rules
loaded with the shortened `for:`, labels landing as written (honor_labels), and
DroverWorkerDown firing through the alerts API for the dead target only.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from lab import prometheus
from lab.layout import LabLayout
from lab.proc import LabError, alive, wait_until
from lab.prometheus import LAB_ALERT_FOR, SHIPPED_RULES, LabPrometheus, shorten_for

FIRE_TIMEOUT_S = 60.0
IN_FLIGHT = {
    "host": "h1",
    "job": "j-1",
    "domain": "web-1",
    "src": "h1",
    "dst": "h2",
    "mode": "p2p-native",
}


def rules_by_alert(text: str) -> dict[str, dict[str, object]]:
    groups = yaml.safe_load(text)["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"]}


def test_lab_rules_shorten_only_the_named_alerts() -> None:
    shipped = SHIPPED_RULES.read_text()
    copy = shorten_for(shipped, LAB_ALERT_FOR)
    before, after = rules_by_alert(shipped), rules_by_alert(copy)
    assert before.keys() == after.keys()
    for name, rule in after.items():
        assert rule["expr"] == before[name]["expr"], name
        expected = LAB_ALERT_FOR.get(name, before[name].get("for"))
        assert rule.get("for") == expected, name


def test_lab_rules_refuse_an_unknown_alert_or_duration() -> None:
    with pytest.raises(LabError, match="no alert DroverNoSuchAlert"):
        shorten_for(SHIPPED_RULES.read_text(), {"DroverNoSuchAlert": "1s"})
    with pytest.raises(LabError, match="not a Prometheus duration"):
        shorten_for(SHIPPED_RULES.read_text(), {"DroverWorkerDown": "1 s"})


def test_lab_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    (tmp_path / "alerts.yml").write_text(shorten_for(SHIPPED_RULES.read_text(), LAB_ALERT_FOR))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        prometheus.render_config({"lab1": "10.213.4.1:9641"}, ["127.0.0.1:9640"], "alerts.yml")
    )
    promtool = shutil.which("promtool")
    assert promtool, "Debian's prometheus package is needed (make deps installs it)"
    result = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def worker_exporter() -> Iterator[str]:
    """A stand-in for a worker's exporter: drover_worker_up and one in-flight series."""
    registry = CollectorRegistry()
    Gauge("drover_worker_up", "up", ["host"], registry=registry).labels(host="h1").set(1)
    remaining = Gauge(
        "drover_migration_data_remaining_bytes", "left", list(IN_FLIGHT), registry=registry
    )
    remaining.labels(**IN_FLIGHT).set(4096)
    port = prometheus.free_port()
    server, thread = start_http_server(port, prometheus.LOOPBACK, registry=registry)
    yield f"{prometheus.LOOPBACK}:{port}"
    server.shutdown()
    thread.join()


@pytest.fixture
def server(tmp_path: Path, worker_exporter: str) -> Iterator[LabPrometheus]:
    lab = LabLayout(lab_id=0, dir=tmp_path / "lab")
    nobody = f"{prometheus.LOOPBACK}:{prometheus.free_port()}"  # a worker that is down
    running = prometheus.start(lab, {"h1": worker_exporter, "h2": nobody}, [])
    yield running
    running.stop()
    assert not alive(running.pid) and not running.data_dir.exists()


def test_lab_prometheus_scrapes_and_fires_worker_down(server: LabPrometheus) -> None:
    api = server.api
    durations = {r["name"]: r["duration"] for g in api.rule_groups() for r in g["rules"]}
    assert durations["DroverWorkerDown"] == 2  # seconds: the lab's copy
    assert durations["DroverMigrationNoProgress"] == 300  # as shipped

    def remaining_scraped() -> bool:
        return bool(api.query("drover_migration_data_remaining_bytes"))

    wait_until(remaining_scraped, FIRE_TIMEOUT_S, "the in-flight series to be scraped")
    (sample,) = api.query("drover_migration_data_remaining_bytes")
    assert sample.value == 4096
    # The exporter's own `job` (a job id) and `host` survive the scrape (honor_labels).
    assert {k: sample.labels[k] for k in IN_FLIGHT} == IN_FLIGHT

    wait_until(lambda: bool(api.firing("DroverWorkerDown")), FIRE_TIMEOUT_S, "DroverWorkerDown")
    (alert,) = api.firing("DroverWorkerDown")
    assert alert["host"] == "h2" and alert["job"] == prometheus.WORKER_JOB
    up = {s.labels["host"]: s.value for s in api.query('up{job="drover-worker"}')}
    assert up == {"h1": 1.0, "h2": 0.0}


def test_a_bad_query_is_one_line_error(server: LabPrometheus) -> None:
    with pytest.raises(LabError, match="parse error") as info:
        server.api.query("sum(")
    assert "\n" not in str(info.value)
