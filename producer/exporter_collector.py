"""The fleet exporter's series, read from Redis at scrape time (a prometheus_client Collector).

Why at scrape time: the figures are Redis's, not this process's; reading them when Prometheus
asks means a scrape never shows what Redis said minutes ago. Why the care about who answers:
Prometheus scrapes every `drover exporter` (any number run, so that one can die), and the
fleet's series must reach it once. So only the exporter holding the lease (jobs/lease.py)
reads the fleet; a standby serves `drover_exporter_active 0` and nothing else.

A scrape while Redis is down or silent gives up after `tunables.exporter_redis_timeout` and
says so: `drover_exporter_redis_up 0` and no fleet series at all, never stale figures shown
as fresh. When Redis answers but holds something drover cannot read where a figure comes
from (anyone with its password can write a string where a set should be), only that figure
is left out, and `drover_exporter_read_errors_total{part}` counts the scrape: one hostile
write must not blind the fleet's alerts. Names and their KubeVirt equivalents:
docs/metrics.md, "Fleet: drover exporter".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from config.settings import Settings
from jobs.connection import OUTAGE_ERRORS
from jobs.fleet import Fleet, read_fleet
from jobs.retention import retention_seconds
from schedules.entries import read_schedules
from schedules.records import Schedule

PREFIX = "drover_"
# What a scrape takes as "Redis is down": any Redis error, refused or timed-out connects.
REDIS_FAILURES: tuple[type[Exception], ...] = (redis.RedisError, *OUTAGE_ERRORS)
# The parts of a scrape that can be left out on their own (`drover_exporter_read_errors_total`).
PARTS = ("jobs", "waiting", "evacuations", "guests_left", "maintenance", "schedules")


def decode_leniently(client: redis.Redis) -> redis.Redis:
    """`client` (before its first command), decoding bytes that are not UTF-8 as U+FFFD: a
    strict decode of one such member or field, which anyone with the Redis password can
    write, fails the whole MULTI reply it is in (every figure, HTTP 500), not one figure."""
    client.connection_pool.connection_kwargs["encoding_errors"] = "replace"
    return client


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}{name}", doc, labels=labels)


class FleetCollector(Collector):
    """Collects at each scrape; `active()` says whether this exporter holds the lease, and
    `settings()` gives the registry as it is now (config.settings.current: a host added to
    drover.toml is in the next scrape's `drover_workers_alive`)."""

    def __init__(
        self, settings: Callable[[], Settings], client: redis.Redis, active: Callable[[], bool]
    ) -> None:
        self.settings = settings
        self.r = client
        self.active = active
        self._lock = threading.Lock()  # scrapes may run at once (one HTTP thread each)
        self._read_errors = dict.fromkeys(PARTS, 0)  # part -> scrapes that left some out

    def collect(self) -> Iterator[Metric]:
        active = self.active()
        flag = _gauge("exporter_active", "1 on the active fleet exporter, 0 on a standby")
        flag.add_metric([], 1.0 if active else 0.0)
        yield flag
        if not active:
            return
        try:
            fleet, schedules, unreadable = self._read()
        except REDIS_FAILURES:
            fleet, schedules, unreadable = None, None, frozenset()
        up = _gauge("exporter_redis_up", "1 when Redis answered this scrape's reads of the fleet")
        up.add_metric([], 0.0 if fleet is None else 1.0)
        yield up
        yield self._count(unreadable)
        if fleet is not None:
            yield from fleet_metrics(fleet)
        if schedules is not None:
            yield from schedule_metrics(schedules)

    def _read(self) -> tuple[Fleet, list[Schedule] | None, frozenset[str]]:
        """The fleet, the schedules (None when their index cannot be read) and the parts of
        which something was left out; an outage raises."""
        settings = self.settings()
        tunables = settings.tunables
        fleet = read_fleet(
            self.r,
            settings.hosts,
            now_s=time.time(),
            retention_s=retention_seconds(tunables.job_retention_days),
        )
        # Each entry on its own: one drover cannot read (written into Redis by hand) is left
        # out of the scrape, the other schedules and the fleet's figures still count.
        unreadable: list[str] = []
        schedules: list[Schedule] | None
        try:
            schedules = read_schedules(self.r, unreadable=unreadable)
        except redis.ResponseError:  # the index is not a sorted set: Redis answered
            schedules = None
        lost = {"schedules"} if schedules is None or unreadable else set()
        return fleet, schedules, fleet.unreadable | lost

    def _count(self, unreadable: frozenset[str]) -> Metric:
        with self._lock:
            for part in unreadable:
                self._read_errors[part] += 1
            counts = sorted(self._read_errors.items())
        errors = CounterMetricFamily(
            f"{PREFIX}exporter_read_errors",
            "scrapes that left out some of a part of the fleet: Redis held something drover "
            "cannot read there (a key of the wrong type, a record or member not drover's)",
            labels=["part"],
        )
        for part, n in counts:
            errors.add_metric([part], n)
        return errors


def fleet_metrics(fleet: Fleet) -> Iterator[Metric]:
    """Jobs, waiting lines, evacuations, workers and maintenance, as read by jobs/fleet.py."""
    jobs = _gauge("jobs", "migration jobs by state (finished ones within the retention)", ["state"])
    for state, n in sorted(fleet.jobs.items()):
        jobs.add_metric([state], n)
    yield jobs
    if fleet.waiting is not None:
        waiting = _gauge(
            "jobs_waiting",
            "jobs waiting for admission, by the gate (limit) refusing their lane's head; "
            "gate=none: not refused yet",
            ["gate"],
        )
        for gate, n in sorted(fleet.waiting.items()):
            waiting.add_metric([gate], n)
        yield waiting
    evacuations = _gauge(
        "evacuations", "evacuations by state (finished ones within the retention)", ["state"]
    )
    for state, n in sorted(fleet.evacuations.items()):
        evacuations.add_metric([state], n)
    yield evacuations
    if fleet.guests_left is not None:
        left = _gauge(
            "evacuation_guests_left",
            "domains of a running evacuation's plan not yet moved off its host",
            ["evacuation", "host"],
        )
        for row in fleet.guests_left:
            left.add_metric([row.evacuation, row.host], row.left)
        yield left
    alive = _gauge(
        "workers_alive", "1 when the registry host's worker heartbeat is in Redis", ["host"]
    )
    for host, beat in sorted(fleet.alive.items()):
        alive.add_metric([host], 1.0 if beat else 0.0)
    yield alive
    if fleet.maintenance is not None:
        yield from _maintenance(fleet.maintenance)


def _maintenance(maintenance: dict[str, float | None]) -> Iterator[Metric]:
    count = _gauge("hosts_in_maintenance", "hosts disabled for maintenance (drover host disable)")
    count.add_metric([], len(maintenance))
    yield count
    since = _gauge(
        "host_maintenance_since_timestamp_seconds",
        "when a host in maintenance was disabled (unix time)",
        ["host"],
    )
    for host, at in sorted(maintenance.items()):
        if at is not None:
            since.add_metric([host], at)
    yield since


def schedule_metrics(schedules: list[Schedule]) -> Iterator[Metric]:
    """One series per scheduled evacuation, and when it fires next (absent when it will not:
    a one-shot already sent, or an expression drover no longer parses)."""
    info = _gauge(
        "schedules",
        "scheduled actions (drover schedule list): 1 per schedule",
        ["schedule_id", "action", "host", "kind"],
    )
    fire = _gauge(
        "schedule_next_fire_timestamp_seconds",
        "when the schedule fires next (unix time)",
        ["schedule_id"],
    )
    for s in schedules:
        kind = "cron" if s.record.cron is not None else "at"
        info.add_metric([s.id, s.record.action, s.record.request.host, kind], 1.0)
        if s.next_run is not None:
            fire.add_metric([s.id], s.next_run.timestamp())
    yield info
    yield fire
