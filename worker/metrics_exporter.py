"""The worker's exporter: its registry on HTTP, and the host snapshot its gauges read.

Started with the worker (worker/tasks.py, on worker_ready, whichever command started it) on
the registry's `metrics_address`:`metrics_port` of the host (port 0: none). A port that
cannot be bound does not stop the worker: migrations and evacuations matter more than their
figures, and a worker refusing to start over a port clash would leave its host unserved
(maybe mid-evacuation). It says so in a `metrics.unavailable` event; Prometheus shows the
target down, and `drover hosts` still shows the worker alive.
"""

from __future__ import annotations

import redis
from prometheus_client import start_http_server

from config.events import get_logger
from config.metrics import NO_EXPORTER
from jobs.host_load import host_load
from worker.metrics_host import DIRECTIONS, HostSnapshot
from worker.runtime import Runtime

log = get_logger()


def bind_address(address: str) -> str:
    """The registry's address as a socket takes it (an IPv6 address without brackets)."""
    return address.removeprefix("[").removesuffix("]")


def start_exporter(rt: Runtime) -> bool:
    """Serve the runtime's registry (once per process); whether it listens now."""
    if rt.metrics is None or rt.metrics_listening:
        return rt.metrics_listening
    entry = rt.registry_entry
    if entry.metrics_port == NO_EXPORTER:
        return False
    where = {"address": entry.metrics_address, "port": entry.metrics_port}
    try:
        start_http_server(
            entry.metrics_port, bind_address(entry.metrics_address), rt.metrics.registry
        )
    except OSError as exc:
        log.error("metrics.unavailable", **where, error=str(exc))
        return False
    rt.metrics_listening = True
    log.info("metrics.listening", **where)
    return True


def cache_host(rt: Runtime, report: dict[str, object]) -> None:
    """Leave what the report tick saw for the host gauges (worker/metrics_host.py): the
    report's figures, and slots and maintenance in one pipelined read."""
    limits = rt.registry_entry.limits
    try:
        load = host_load(rt.store.r, rt.host)
        held: dict[str, int] | None = {"out": load.slots_out, "in": load.slots_in}
        maintenance: bool | None = load.maintenance
    except redis.RedisError:
        held, maintenance = None, None
    free = report.get("free_mib")
    running = report.get("running")
    rt.host_snapshot = HostSnapshot(
        libvirtd_up="error" not in report,
        free_mib=free if isinstance(free, int) else None,
        running=len(running) if isinstance(running, list) else None,
        slots_held=held,
        slots_limit=dict(zip(DIRECTIONS, (limits.max_inbound, limits.max_outbound), strict=True)),
        maintenance=maintenance,
    )
