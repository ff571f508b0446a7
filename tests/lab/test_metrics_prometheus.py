"""drover's metrics as a real Prometheus sees them, on the real lab.

Debian's Prometheus (lab/prometheus.py) scrapes every lab worker's exporter and `drover
exporter` once a second, with the shipped alert rules. While dirty-1 migrates under a
bandwidth cap, PromQL over the HTTP API returns its remaining bytes and dirty rate; once it
succeeded, the outcome counter has risen by exactly one and the in-flight series are gone; a
worker killed fires DroverWorkerDown (the alerts API shows it) and is started again; every
series the Grafana dashboard and the alert rules read exists in a live scrape.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from config.redis_acl import PRODUCER
from lab import control
from lab import prometheus as lab_prometheus
from lab.fleet_exporter import LabExporter, start_exporter
from lab.metrics import metrics_targets, metrics_url
from lab.prometheus import LabPrometheus
from lab.prometheus_api import PrometheusAPI
from lab.state import loaded
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, wait_for
from tests.support.promql_names import dashboard_exprs, exposed_names, metric_names

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "drover.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_TIMEOUT_S = 60.0
# How long a series, its end or an alert may take to show in Prometheus: a scrape and an
# evaluation a second apart, the lab's shortened `for:`, a heartbeat's time to live.
SHOW_TIMEOUT_S = 90.0
SLOW_MIB = 8  # far below dirty-1's dirty rate: pre-copy never ends on its own
KILLED = "lab3"  # a host no other step of this module migrates to or from
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Observed:
    prometheus: LabPrometheus
    exporter: LabExporter

    @property
    def api(self) -> PrometheusAPI:
        return self.prometheus.api

    def value(self, expr: str) -> float | None:
        """The single value of an instant query (None: an empty result)."""
        samples = self.api.query(expr)
        assert len(samples) <= 1, (expr, samples)
        return samples[0].value if samples else None


def succeeded_by_host(observed: Observed) -> dict[str, float]:
    """drover_migrations_total{outcome="succeeded"} per host, over every mode."""
    query = 'sum by (host) (drover_migrations_total{outcome="succeeded"})'
    return {s.labels["host"]: s.value for s in observed.api.query(query)}


def lab1_metrics() -> str:
    return metrics_url(control.status()["hosts"]["lab1"]["address"])


def scrape(url: str) -> str:
    with _OPENER.open(url, timeout=SCRAPE_TIMEOUT_S) as response:
        return bytes(response.read()).decode()


@pytest.fixture(scope="module")
def observed(lab: Lab) -> Iterator[Observed]:
    layout, state = loaded()
    exporter = start_exporter(Path(state.config), state.url(PRODUCER), layout.dir / "exporter.log")
    try:
        server = lab_prometheus.start(layout, metrics_targets(), [exporter.target])
        try:
            observed = Observed(server, exporter)

            def all_up() -> bool:
                targets = observed.api.targets()
                return len(targets) == len(lab.hosts()) + 1 and all(
                    t["health"] == "up" for t in targets
                )

            wait_for(all_up, SCRAPE_TIMEOUT_S, "every worker and the exporter scraped")
            yield observed
        finally:
            server.stop()
    finally:
        exporter.stop()


def test_dashboard_and_rules_read_only_series_drover_exports(lab: Lab, observed: Observed) -> None:
    """Every metric name in deploy/grafana/drover.json and deploy/prometheus/alerts.yml, held
    against a live scrape of a worker and of `drover exporter` (`up` is Prometheus's). A
    worker exports its host's figures from its first report on: scraped until they show."""
    dashboard = json.loads(DASHBOARD.read_text())
    read = {n for expr in dashboard_exprs(dashboard) for n in metric_names(expr)}
    rules = yaml.safe_load(RULES.read_text())["groups"]
    read |= {n for g in rules for r in g["rules"] for n in metric_names(r["expr"])}
    worker = lab1_metrics()

    def missing() -> set[str]:
        exposed = exposed_names(scrape(worker)) | exposed_names(observed.exporter.scrape())
        return read - exposed - {"up"}

    with contextlib.suppress(AssertionError):  # the assert below names what is missing
        wait_for(lambda: not missing(), SHOW_TIMEOUT_S, "every series read to be exported")
    assert missing() == set()


def test_a_migration_in_flight_then_counted_once(
    lab: Lab, observed: Observed, dirty_running: None
) -> None:
    before = succeeded_by_host(observed)
    job_id = lab.drover.submit(
        domain="dirty-1", src="lab1", dst="lab2", live=True, policy="manual",
        bandwidth_mib=SLOW_MIB,
    )  # fmt: skip
    try:
        selector = f'{{job="{job_id}"}}'
        remaining = f"drover_migration_data_remaining_bytes{selector} > 0"
        dirty = f"drover_migration_dirty_rate_bytes_per_second{selector} > 0"
        wait_for(lambda: bool(observed.api.query(remaining)), SHOW_TIMEOUT_S, "remaining bytes")
        wait_for(lambda: bool(observed.api.query(dirty)), SHOW_TIMEOUT_S, "a dirty rate")
        (sample,) = observed.api.query(remaining)
        assert {k: sample.labels[k] for k in ("host", "domain", "src", "dst")} == {
            "host": "lab1",
            "domain": "dirty-1",
            "src": "lab1",
            "dst": "lab2",
        }
        # Dirtying faster than the capped link copies: the dashboard's "does not converge".
        transfer = observed.value(f"drover_migration_transfer_rate_bytes_per_second{selector}")
        assert transfer is not None and transfer > 0
        # The source's own exporter, read directly: the job's mode and its current stage.
        ours = [
            sample
            for family in text_string_to_metric_families(scrape(lab1_metrics()))
            for sample in family.samples
            if sample.labels.get("job") == job_id
        ]
        assert {sample.labels["mode"] for sample in ours} == {"p2p-native"}
        stages = {s.labels["stage"] for s in ours if s.name == "drover_migration_stage_seconds"}
        assert stages == {"transfer"}
    finally:
        lab.drover.force_complete(job_id)  # manual forbids post-copy: suspend and finish
    job = lab.drover.wait(job_id, JOB_TIMEOUT_S)
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on("dirty-1") == ["lab2"]  # libvirt's word, on every host

    # Counted once, by the source: lab1's count rises by one, no other host's moves.
    expected = before | {"lab1": before.get("lab1", 0.0) + 1}
    with contextlib.suppress(AssertionError):  # the assert below shows the counts
        wait_for(
            lambda: succeeded_by_host(observed) == expected,
            SHOW_TIMEOUT_S,
            "lab1's succeeded count to rise by one",
        )
    assert succeeded_by_host(observed) == expected
    wait_for(
        lambda: not observed.api.query(f"{{__name__=~'drover_migration_.+', job='{job_id}'}}"),
        SHOW_TIMEOUT_S,
        "the job's in-flight series to be gone",
    )
    assert job_id not in scrape(lab1_metrics())
    # Its downtime (from libvirt's completed statistics) is in the source's histogram.
    downtime = 'sum(drover_migration_downtime_seconds_count{host="lab1", mode="p2p-native"})'
    wait_for(lambda: (observed.value(downtime) or 0) >= 1, SHOW_TIMEOUT_S, "a downtime observed")


def test_a_killed_worker_fires_worker_down(lab: Lab, observed: Observed) -> None:
    assert observed.api.firing("DroverWorkerDown") == []
    control.kill_worker(KILLED)
    try:
        wait_for(
            lambda: [a["host"] for a in observed.api.firing("DroverWorkerDown")] == [KILLED],
            SHOW_TIMEOUT_S,
            f"DroverWorkerDown firing for {KILLED}",
        )
        (alert,) = [
            a
            for a in observed.api.alerts("firing")
            if a["labels"]["alertname"] == "DroverWorkerDown"
        ]
        assert alert["labels"]["severity"] == "critical"
        assert KILLED in alert["annotations"]["summary"]
        # The fleet exporter sees its heartbeat lapse too.
        wait_for(
            lambda: (
                [a["host"] for a in observed.api.firing("DroverWorkerHeartbeatLost")] == [KILLED]
            ),
            SHOW_TIMEOUT_S,
            f"DroverWorkerHeartbeatLost firing for {KILLED}",
        )
    finally:
        control.restart_worker(KILLED)
        lab.status = control.status()
    wait_for(
        lambda: (
            not observed.api.firing("DroverWorkerDown")
            and not observed.api.firing("DroverWorkerHeartbeatLost")
        ),
        SHOW_TIMEOUT_S,
        "the worker-down alerts to resolve",
    )
    assert observed.value(f'up{{job="drover-worker", host="{KILLED}"}}') == 1.0
