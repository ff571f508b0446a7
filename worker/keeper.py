"""The worker's housekeeping: a few duties, each on its own tick, in two small loops.

The heartbeat (with lease renewal) runs alone; the other loop reports the host, admits
waiting jobs, watches this host's evacuations and sweeps for recovery. Kept out of the task
code: phases never wait on it, and it never runs a migration itself except to settle one
this host had started and lost (worker/recovery.py). Intervals are re-read every pass, as
the config file may change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt
import redis

from config.events import get_logger
from config.settings import Tunables
from jobs.store import now
from worker import evacuation, recovery
from worker.admission_pass import admit_waiting
from worker.libvirt_host import LibvirtUnavailable, placement_room_mib
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


def host_report(rt: Runtime) -> dict[str, Any]:
    """What `drover hosts` shows of this host: room for guests and what runs here now."""
    conn = rt.libvirt.conn
    active = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    reserved = rt.store.reserved_mib(rt.host)
    return {
        "ts": now().isoformat(),
        "free_mib": placement_room_mib(conn, reserved, rt.registry_entry.limits.memory_mib),
        "reserved_mib": reserved,
        "running": sorted(d.name() for d in active),
    }


def _heartbeat(rt: Runtime) -> None:
    """Liveness, and the leases of every live job this host takes part in (waiting in line,
    queued in Celery or running): Redis only, so a hung libvirtd cannot delay it."""
    tunables = rt.settings.tunables
    rt.store.heartbeat(rt.host, tunables.heartbeat_ttl)
    for job_id in rt.store.active_ids():
        if rt.host in rt.store.hosts_of(job_id):
            rt.store.renew_leases(job_id, tunables.domain_lease)


def _report(rt: Runtime) -> None:
    try:
        report = host_report(rt)
    except (LibvirtUnavailable, libvirt.libvirtError) as exc:
        report = {"ts": now().isoformat(), "error": str(exc)}
    rt.store.report_host(rt.host, report, rt.settings.tunables.heartbeat_ttl)


def heartbeat_duties() -> list[Duty]:
    return [Duty("heartbeat", lambda t: t.heartbeat_interval, _heartbeat)]


def duties() -> list[Duty]:
    """The rest: these may wait on libvirt (reports, recovery, an evacuation's checks)."""
    return [
        Duty("report", lambda t: t.heartbeat_interval, _report),
        Duty("recovery", lambda t: t.watchdog_interval, recovery.sweep),
        Duty("admission", lambda t: t.admission_interval, admit_waiting),
        Duty("evacuations", lambda t: t.evacuation_check_interval, evacuation.watch),
    ]


class Keeper(threading.Thread):
    def __init__(self, rt: Runtime, name: str, jobs: list[Duty]) -> None:
        super().__init__(name=name, daemon=True)
        self.rt = rt
        self.stop = threading.Event()
        self.duties = jobs

    def run(self) -> None:
        while not self.stop.is_set():
            tunables = self.rt.settings.tunables
            for duty in self.duties:
                if time.monotonic() < duty.due:
                    continue
                try:
                    duty.run(self.rt)
                except redis.RedisError as exc:
                    log.warning("keeper.redis_unavailable", duty=duty.name, error=str(exc))
                except Exception as exc:  # the keeper must outlive any one bad job
                    log.exception("keeper.error", duty=duty.name, error=str(exc))
                duty.due = time.monotonic() + duty.interval(tunables)
            next_due = min(d.due for d in self.duties) - time.monotonic()
            self.stop.wait(min(max(next_due, 0.0), MAX_TICK_S))


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
