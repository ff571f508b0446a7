"""The worker's housekeeping: a few duties, each on its own tick, in two small loops.

The heartbeat (with lease renewal) runs alone; the other loop reports the host, admits
waiting jobs, watches this host's evacuations and sweeps for recovery. Kept out of the task
code: phases never wait on it, and it never runs a migration itself except to settle one
this host had started and lost (worker/recovery.py). Intervals are re-read every pass, as
the config file may change; a file that cannot be read keeps the last good settings
(config/settings.py) and is reported here. During a warm shutdown only the heartbeat (which
then says "draining") and the config watch go on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis

from config.events import get_logger
from config.settings import Tunables, config_problem
from jobs.host_facts import MAX_TEXT, HostFacts, publish_facts
from jobs.phases import PHASE_NAMES
from jobs.reservation_read import reserved_by_host
from jobs.store import JobNotFound, now
from worker import evacuation_watch, recovery
from worker.admission_pass import admit_safety, admit_waiting
from worker.host_memory import room_mib
from worker.host_probe import collect_facts
from worker.job_end import job_context
from worker.leftovers import sweep_leftovers
from worker.libvirt_host import LibvirtError, LibvirtUnavailable
from worker.maintenance_kept import remember_maintenance
from worker.metrics_exporter import cache_host, start_exporter
from worker.runtime import Runtime

log = get_logger()
# The loop never sleeps longer than this, so a shortened interval takes effect promptly.
MAX_TICK_S = 1.0


@dataclass
class Duty:
    name: str
    interval: Callable[[Tunables], float]
    run: Callable[[Runtime], object]
    due: float = 0.0  # monotonic time; 0 = at once (recovery after a restart comes first)
    while_draining: bool = False  # whether it still runs during a warm shutdown


def host_report(rt: Runtime) -> tuple[HostFacts, dict[str, Any]]:
    """This host's facts for the planner (jobs/host_facts.py), and what `drover hosts` shows
    of it: room for guests and what runs here now. One look at libvirt for both."""
    facts = collect_facts(
        rt.libvirt.conn, rt.host, rt.worker_id, rt.settings.tunables.host_cpu_refresh
    )
    # Bookings that cannot be read (the host's reservations key is not a hash) leave no room,
    # and are said (jobs/reservation_read.py): the rest of the report stands.
    found = reserved_by_host(rt.store.r, [rt.host])[rt.host]
    reserved = found if isinstance(found, int) else None
    limit = rt.registry_entry.limits.memory_mib
    report = {
        "ts": facts.ts.isoformat(),
        "free_mib": room_mib(facts.free_mib, facts.active_mib, reserved, limit),
        "reserved_mib": reserved,
        "running": sorted(d.name for d in facts.domains),
        "cpu": _cpu_summary(facts),
    }
    if reserved is None:
        report["reservations_error"] = found
    return facts, report


def _cpu_summary(facts: HostFacts) -> str | None:
    """The host-model CPU of the virt types offered, e.g. `kvm: Skylake-Client (Intel)`."""
    parts = [f"{c.virt_type}: {c.model} ({c.vendor})" for c in facts.cpus if c.model]
    return "; ".join(parts) or None


def _heartbeat(rt: Runtime) -> None:
    """Liveness, and the marks of the phases this process runs (worker/runtime.py): Redis
    only, so a hung libvirtd cannot delay it.

    A draining worker (warm shutdown) no longer says it is alive, which would tell peers it
    takes work; it says it is draining instead, with the jobs it still runs, for as long as
    it keeps running them.
    """
    tunables = rt.settings.tunables
    rt.renew_running()
    if rt.draining:
        with rt.lock:
            running = sorted({job_id for job_id, phase in rt.running if phase in PHASE_NAMES})
        rt.store.set_draining(rt.host, _drain_report(rt, running), tunables.heartbeat_ttl)
        rt.store.drop_heartbeat(rt.host, rt.worker_id)
        return
    rt.store.heartbeat(rt.host, tunables.heartbeat_ttl, rt.worker_id)


def _drain_report(rt: Runtime, running: list[str]) -> dict[str, Any]:
    waited = rt.drained_for()
    return {
        "since": (now() - timedelta(seconds=waited)).isoformat(),
        "worker": rt.worker_id,
        "running": running,
        "drain_timeout": rt.settings.tunables.drain_timeout,
    }


def _report(rt: Runtime) -> None:
    """The host's report for `drover hosts` and its facts for evacuation planners: a facts
    record that says only why libvirt could not be read when it could not."""
    tunables = rt.settings.tunables
    try:
        facts, report = host_report(rt)
    except (LibvirtUnavailable, LibvirtError) as exc:
        report = {"ts": now().isoformat(), "error": str(exc)}
        facts = HostFacts(
            host=rt.host,
            worker=rt.worker_id,
            ts=now(),
            free_mib=0,
            active_mib=0,
            error=str(exc)[:MAX_TEXT],
        )
    if rt.config_problem:
        report["config_error"] = rt.config_problem
    cache_host(rt, report)  # for the exporter's host gauges: a scrape reads nothing itself
    rt.store.report_host(rt.host, report, tunables.heartbeat_ttl)
    publish_facts(rt.store.r, facts, tunables.host_facts_ttl)


def _watch_config(rt: Runtime) -> None:
    """Say loudly, once per change, that the config file on disk is bad and that the last
    good settings stay in use; and again when it is good again. On the log, in `drover
    hosts`, and on the stream of every live job this host takes part in."""
    problem = config_problem()
    if problem == rt.config_problem:
        return
    rt.config_problem = problem
    name, level = ("config.invalid", "error") if problem else ("config.restored", "info")
    fields = {"reason": f"{problem}; keeping the last good settings"} if problem else {}
    getattr(log, level)(name, **fields)
    for job_id in rt.store.active_ids():
        try:
            job = rt.store.get(job_id)
        except JobNotFound:
            continue
        if rt.host in (job.spec.src, job.spec.dst):
            getattr(log, level)(name, **job_context(job, None), **fields)


def heartbeat_duties() -> list[Duty]:
    return [
        Duty("heartbeat", lambda t: t.heartbeat_interval, _heartbeat, while_draining=True),
        Duty("config", lambda t: t.heartbeat_interval, _watch_config, while_draining=True),
        # At once, and again while the port is held (by the worker this one replaces).
        Duty("metrics", lambda t: t.heartbeat_interval, start_exporter),
    ]


def duties() -> list[Duty]:
    """The rest: these may wait on libvirt (reports, recovery, an evacuation's checks).

    None of them runs while the worker drains: it starts nothing new, recovers nothing (a
    worker beside it may), and leaves the host's report to a worker that takes work.
    """
    return [
        Duty("report", lambda t: t.heartbeat_interval, _report),
        Duty("maintenance", lambda t: t.heartbeat_interval, remember_maintenance),
        Duty("recovery", lambda t: t.watchdog_interval, recovery.sweep),
        Duty("leftovers", lambda t: t.watchdog_interval, sweep_leftovers),
        Duty("admission", lambda t: t.admission_interval, admit_waiting),
        Duty("admission-safety", lambda t: t.admission_safety_interval, admit_safety),
        Duty("evacuations", lambda t: t.evacuation_check_interval, evacuation_watch.watch),
    ]


class Keeper(threading.Thread):
    """Runs its duties for as long as the process lives: no error in one pass (Redis gone,
    libvirt gone, a bug, a config that cannot be read) stops the next."""

    def __init__(self, rt: Runtime, name: str, jobs: list[Duty]) -> None:
        super().__init__(name=name, daemon=True)
        self.rt = rt
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.duties = jobs

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.run_due()
            except Exception as exc:  # what run_due itself did not catch: never die
                log.exception("keeper.error", duty=None, error=str(exc))
            next_due = min(d.due for d in self.duties) - time.monotonic()
            self.wake.wait(min(max(next_due, 0.0), MAX_TICK_S))
            self.wake.clear()

    def run_due(self) -> None:
        tunables = self.rt.settings.tunables
        for duty in self.duties:
            if time.monotonic() < duty.due or (self.rt.draining and not duty.while_draining):
                continue
            try:
                duty.run(self.rt)
            except redis.RedisError as exc:
                log.warning("keeper.redis_unavailable", duty=duty.name, error=str(exc))
            except Exception as exc:  # the keeper must outlive any one bad job
                log.exception("keeper.error", duty=duty.name, error=str(exc))
            duty.due = time.monotonic() + duty.interval(tunables)


_keepers: dict[str, list[Keeper]] = {}


def start_keeper(rt: Runtime) -> None:
    """Two threads: the heartbeat on its own, so that nothing the others wait on (libvirt)
    can make this host look dead to its peers."""
    if rt.host not in _keepers:
        _keepers[rt.host] = [
            Keeper(rt, "drover-heartbeat", heartbeat_duties()),
            Keeper(rt, "drover-keeper", duties()),
        ]
        for keeper in _keepers[rt.host]:
            keeper.start()


def begin_drain(host: str) -> None:
    """Warm shutdown began (Celery's worker_shutting_down, in a signal handler: no I/O here).

    Celery stops taking messages and waits for the running tasks; the keepers, woken now,
    say that the host is draining and stop every duty that would start or recover work.
    """
    for keeper in _keepers.get(host, []):
        if keeper.rt.draining_since is None:
            keeper.rt.draining_since = time.monotonic()
        keeper.wake.set()
