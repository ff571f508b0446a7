"""A real Prometheus (Debian's `prometheus`) scraping a lab: its workers' exporters and
`drover exporter`, with drover's own alert rules (deploy/prometheus/alerts.yml).

Why: the metrics and the rules are only worth what a real Prometheus makes of them: the
scrape format, the labels as they land (`honor_labels`, as deploy/prometheus/prometheus.yml
has it), the rules evaluated, the alerts firing. So the lab test runs the server itself, in
the root namespace, where each lab worker's exporter is reachable on its host's address.

Everything it writes is its own: the generated config and rules under the lab directory
(`prometheus/`), the time series in a temporary directory removed on `stop`. Scrapes and
rule evaluations every second. The rules are the shipped ones, expressions unchanged; only
the `for:` of the alerts a test waits for is shortened (`LAB_ALERT_FOR`) in the copy, so that
a worker killed shows as DroverWorkerDown within seconds rather than the shipped minute.
The HTTP API (queries, alerts): lab/prometheus_api.py.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lab.layout import LabLayout
from lab.proc import LabError, alive, kill, spawn, wait_until
from lab.prometheus_api import PrometheusAPI
from lab.workers import SOURCE_ROOT

PROMETHEUS_COMMAND = "prometheus"
PROMETHEUS_PACKAGE = "prometheus"
SHIPPED_RULES = SOURCE_ROOT / "deploy" / "prometheus" / "alerts.yml"
# The scrape jobs as deploy/prometheus/prometheus.yml names them (the rules use the names).
WORKER_JOB = "drover-worker"
EXPORTER_JOB = "drover-exporter"
LAB_INTERVAL = "1s"
START_TIMEOUT = 60.0
STOP_GRACE = 10.0
# The alerts a lab test waits for, and the `for:` they get in the lab's copy of the rules.
LAB_ALERT_FOR = {"DroverWorkerDown": "2s", "DroverWorkerHeartbeatLost": "2s"}
LOOPBACK = "127.0.0.1"
_DURATION = re.compile(r"(?:\d+(?:ms|[smhdwy]))+")


def free_port(address: str = LOOPBACK) -> int:
    """A port nothing listens on now (the kernel's pick), for a server started next."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def shorten_for(rules: str, durations: Mapping[str, str]) -> str:
    """`rules` (alerts.yml's text) with the `for:` of each alert named in `durations` set to
    its value; LabError if an alert is missing or has no `for:`.

    Text, not YAML rewritten: the copy keeps the file's expressions byte for byte."""
    for alert, duration in durations.items():
        if not _DURATION.fullmatch(duration):
            raise LabError(f"`for: {duration}` for {alert} is not a Prometheus duration")
        block = re.compile(
            rf"(^\s*- alert: {re.escape(alert)}\n(?:(?!\s*- alert:).*\n)*?\s*for: )\S+$", re.M
        )
        rules, count = block.subn(rf"\g<1>{duration}", rules, count=1)
        if count != 1:
            raise LabError(f"{SHIPPED_RULES.name}: no alert {alert} with a `for:`")
    return rules


def render_config(workers: Mapping[str, str], exporters: list[str], rules_file: str) -> str:
    """prometheus.yml (as JSON, which is YAML) for the lab: every worker target (host ->
    `ADDR:PORT`, labelled with its host as the shipped config does) and `drover exporter`."""
    config = {
        "global": {
            "scrape_interval": LAB_INTERVAL,
            "scrape_timeout": LAB_INTERVAL,
            "evaluation_interval": LAB_INTERVAL,
        },
        "rule_files": [rules_file],
        "scrape_configs": [
            {
                "job_name": WORKER_JOB,
                "honor_labels": True,
                "static_configs": [
                    {"targets": [target], "labels": {"host": host}}
                    for host, target in sorted(workers.items())
                ],
            },
            {"job_name": EXPORTER_JOB, "static_configs": [{"targets": exporters}]},
        ],
    }
    return json.dumps(config, indent=2) + "\n"


@dataclass
class LabPrometheus:
    """A running Prometheus: its pid, HTTP API, and where its files are."""

    pid: int
    api: PrometheusAPI
    config_dir: Path
    data_dir: Path

    @property
    def log(self) -> Path:
        return self.config_dir / "prometheus.log"

    def stop(self) -> None:
        """SIGTERM (Prometheus closes its database), SIGKILL after a grace; data removed."""
        kill([self.pid], grace=STOP_GRACE)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start(
    lab: LabLayout,
    workers: Mapping[str, str],
    exporters: list[str],
    alert_for: Mapping[str, str] = LAB_ALERT_FOR,
) -> LabPrometheus:
    """Start Prometheus on 127.0.0.1 (a free port) scraping `workers` (host -> ADDR:PORT,
    lab/metrics.py `metrics_targets`) and `exporters` (ADDR:PORT of `drover exporter`), with
    the shipped rules, `alert_for` shortened; return once it is ready."""
    binary = shutil.which(PROMETHEUS_COMMAND)
    if binary is None:
        raise LabError(
            f"missing {PROMETHEUS_COMMAND}: run `make deps` (Debian's {PROMETHEUS_PACKAGE})"
        )
    config_dir = lab.dir / "prometheus"
    config_dir.mkdir(parents=True, exist_ok=True)
    rules = config_dir / SHIPPED_RULES.name
    rules.write_text(shorten_for(SHIPPED_RULES.read_text(encoding="utf-8"), alert_for))
    config = config_dir / "prometheus.yml"
    config.write_text(render_config(workers, exporters, rules.name))
    data_dir = Path(tempfile.mkdtemp(prefix="drover-prometheus-"))
    port = free_port()
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address={LOOPBACK}:{port}",
    ]
    pid = spawn(argv, config_dir / "prometheus.log")
    server = LabPrometheus(pid, PrometheusAPI(f"http://{LOOPBACK}:{port}"), config_dir, data_dir)

    def ready() -> bool:
        if not alive(pid):
            raise LabError(f"prometheus exited; see {server.log}")
        return server.api.ready()

    try:
        wait_until(ready, START_TIMEOUT, "prometheus to be ready")
    except BaseException:
        server.stop()
        raise
    return server
