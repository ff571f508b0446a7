"""`drover exporter` for the lab: the fleet's exporter in the root namespace, on loopback.

Why a helper: the lab's Prometheus (lab/prometheus.py) scrapes it beside the workers, and a
test needs it started on a free port against the lab's Redis and stopped afterwards, as any
operator would run it (`drover exporter --listen ADDR:PORT`), from this checkout's code.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lab.proc import LabError, alive, kill, spawn, wait_until
from lab.prometheus import LOOPBACK, free_port
from lab.workers import worker_env

EXPORTER_START_TIMEOUT = 30.0
SCRAPE_TIMEOUT = 5.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class LabExporter:
    pid: int
    target: str  # ADDR:PORT, as a Prometheus static target
    log: Path

    @property
    def metrics_url(self) -> str:
        return f"http://{self.target}/metrics"

    def scrape(self) -> str:
        """One scrape of /metrics (Prometheus's text format)."""
        try:
            with _OPENER.open(self.metrics_url, timeout=SCRAPE_TIMEOUT) as response:
                return bytes(response.read()).decode()
        except (urllib.error.URLError, OSError) as exc:
            raise LabError(f"drover exporter at {self.target}: {exc}") from None

    def stop(self) -> None:
        kill([self.pid])


def start_exporter(config: Path, redis_url: str, log: Path) -> LabExporter:
    """Start `drover exporter --listen 127.0.0.1:PORT` (a free port) on the registry `config`
    with `redis_url` (a role's URL, in its environment, never on its command line); return
    once /metrics answers."""
    target = f"{LOOPBACK}:{free_port()}"
    argv = [sys.executable, "-m", "cli", "exporter", "--listen", target]
    pid = spawn(argv, log, env=worker_env(config, redis_url))
    exporter = LabExporter(pid, target, log)

    def answers() -> bool:
        if not alive(pid):
            raise LabError(f"drover exporter exited; see {log}")
        try:
            exporter.scrape()
        except LabError:
            return False
        return True

    try:
        wait_until(answers, EXPORTER_START_TIMEOUT, "drover exporter to serve /metrics")
    except BaseException:
        exporter.stop()
        raise
    return exporter
