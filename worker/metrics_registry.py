"""A worker's own Prometheus registry, fed by its events (docs/metrics.md).

`WorkerMetrics.observe` is a step of the structlog chain (config/events.py `configure`,
before the output): every event the worker emits passes it, and the updates the pure table
gives (worker/metrics_events.py) land here. So the metrics say what the job streams say,
with no second path through the code to keep in step, and no Redis or libvirt call on the
way: an update is a dictionary write under a lock.

The registry is the worker's, not prometheus_client's global one (which holds the process
and platform collectors, and whatever a library registers): a scrape shows drover's series.
Migrations in flight are a collector of their own, so that a job's series can go as a whole
when it ends and be dropped at scrape time when their last sample is stale (the worker never
saw the end: another host ended the job, a Redis outage cut the story short).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from config.metrics import (
    DOWNTIME_BUCKETS_S,
    JOB_DURATION_BUCKETS_S,
    MAX_OPEN_PHASES,
    PHASE_DURATION_BUCKETS_S,
)
from worker import metrics_events as m

HOST_LABEL = "host"
_HELP = {
    m.MIGRATIONS: "Migration jobs ended, by the job's terminal state (counted where it ended).",
    m.DURATION: "Migration jobs' duration from admission to end, seconds.",
    m.DOWNTIME: "The guest's downtime at switch-over, seconds (libvirt's completed figures).",
    m.PHASE_DURATION: "Phases run on this host, seconds, by how they ended.",
    m.POLICY_ACTIONS: "Changes made to running migrations, by a policy or an operator.",
    m.RECOVERIES: "Recoveries: phases settled after a lost worker, reattached migrations, "
    "resumed post-copies.",
    m.REFUSED: "Messages and requests refused (the label is the event that said so).",
}
_BUCKETS = {
    m.DURATION: JOB_DURATION_BUCKETS_S,
    m.DOWNTIME: DOWNTIME_BUCKETS_S,
    m.PHASE_DURATION: PHASE_DURATION_BUCKETS_S,
}


@dataclass
class InFlight:
    labels: tuple[str, ...]
    figures: dict[str, float]
    stage: str
    stage_since: float  # unix time the stage was first seen
    last: float  # unix time of the last sample


class InFlightCollector(Collector):
    """The gauges of migrations in flight, built at each scrape from the last samples."""

    def __init__(self, host: str, stale_after: float) -> None:
        self.host = host
        self.stale_after = stale_after
        self.jobs: dict[str, InFlight] = {}
        self.lock = threading.Lock()

    def sample(self, s: m.Sample) -> None:
        with self.lock:
            was = self.jobs.get(s.job)
            since = was.stage_since if was is not None and was.stage == s.stage else s.at
            self.jobs[s.job] = InFlight(s.labels, s.figures, s.stage, since, s.at)

    def gone(self, job: str) -> None:
        with self.lock:
            self.jobs.pop(job, None)

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        with self.lock:
            for job in [j for j, f in self.jobs.items() if now - f.last > self.stale_after]:
                del self.jobs[job]
            flights = list(self.jobs.values())
        labels = [HOST_LABEL, *m.IN_FLIGHT_LABELS]
        for name, help_text in m.IN_FLIGHT_HELP.items():
            family = GaugeMetricFamily(name, help_text, labels=labels)
            for f in flights:
                if name in f.figures:
                    family.add_metric([self.host, *f.labels], f.figures[name])
            yield family
        stage = GaugeMetricFamily(
            m.STAGE_SECONDS,
            "Time in the migration's current stage (setup, transfer, postcopy, completing).",
            labels=[*labels, "stage"],
        )
        last = GaugeMetricFamily(
            m.LAST_PROGRESS, "Unix time of the migration's last progress sample.", labels=labels
        )
        for f in flights:
            stage.add_metric([self.host, *f.labels, f.stage], max(now - f.stage_since, 0.0))
            last.add_metric([self.host, *f.labels], f.last)
        yield stage
        yield last


class WorkerMetrics:
    """The registry of one worker (one host), and the chain step that feeds it."""

    def __init__(self, host: str, stale_after: float) -> None:
        self.host = host
        self.registry = CollectorRegistry()
        self.in_flight = InFlightCollector(host, stale_after)
        self.registry.register(self.in_flight)
        self.counters: dict[str, Counter] = {}
        self.histograms: dict[str, Histogram] = {}
        for name, labels in m.LABELS.items():
            names = [HOST_LABEL, *labels]
            if name in _BUCKETS:
                self.histograms[name] = Histogram(
                    name, _HELP[name], names, registry=self.registry, buckets=_BUCKETS[name]
                )
            else:
                self.counters[name] = Counter(name, _HELP[name], names, registry=self.registry)
        self.open_phases: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.lock = threading.Lock()
        self.errors = 0  # updates that failed (never raised into the chain)

    def observe(self, _logger: Any, _method: str, event: Any) -> Any:
        """The structlog step: the event's metric updates, and the event as it came."""
        try:
            for update in m.updates(event):
                self.apply(update)
        except Exception:  # the metrics must never cost a job an event
            self.errors += 1
        return event

    def apply(self, update: m.Update) -> None:
        match update:
            case m.Sample():
                self.in_flight.sample(update)
            case m.Gone(job=job):
                self.in_flight.gone(job)
            case m.Count(metric=metric, labels=labels):
                self.counters[metric].labels(self.host, *labels).inc()
            case m.Observe(metric=metric, labels=labels, value=value):
                self.histograms[metric].labels(self.host, *labels).observe(value)
            case m.PhaseStart(job=job, phase=phase, at=at):
                self._phase_started(job, phase, at)
            case m.PhaseEnd():
                self._phase_ended(update)

    def _phase_started(self, job: str, phase: str, at: float) -> None:
        with self.lock:
            self.open_phases[(job, phase)] = at
            while len(self.open_phases) > MAX_OPEN_PHASES:
                self.open_phases.popitem(last=False)

    def _phase_ended(self, end: m.PhaseEnd) -> None:
        with self.lock:
            started = self.open_phases.pop((end.job, end.phase), None)
        duration = end.duration_s
        if duration is None and started is not None:
            duration = max(end.at - started, 0.0)
        if duration is not None:
            labels = (self.host, end.phase, end.outcome)
            self.histograms[m.PHASE_DURATION].labels(*labels).observe(duration)
