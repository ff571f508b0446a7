"""The worker's exporter: its registry on HTTP, and the host snapshot its gauges read.

Started with the worker by its heartbeat loop (worker/keeper.py, the `metrics` duty) on the
registry's `metrics_address`:`metrics_port` of the host (port 0: none). A port that cannot
be bound does not stop the worker: migrations and evacuations matter more than their figures,
and a worker refusing to start over a port clash would leave its host unserved (maybe
mid-evacuation, or taking over from a draining worker that still holds the port). It says so
in a `metrics.unavailable` event and tries again every tick; Prometheus shows the target
down meanwhile, and `drover hosts` still shows the worker alive.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import CollectorRegistry, start_http_server

from config.events import get_logger
from config.metrics import NO_EXPORTER
from config.settings import Host, HostLimits
from jobs.host_load import host_load
from worker.metrics_host import HostSnapshot
from worker.runtime import Runtime

log = get_logger()


def bind_address(address: str) -> str:
    """The registry's address as a socket takes it (an IPv6 address without brackets)."""
    return address.removeprefix("[").removesuffix("]")


def serve(registry: CollectorRegistry, entry: Host) -> WSGIServer | None:
    """`registry` on the host's metrics address and port, on a daemon thread; None (and a
    `metrics.unavailable` event) when it cannot listen there, or the port is 0."""
    try:
        return listen(registry, entry)
    except OSError as exc:
        log.error("metrics.unavailable", **where(entry), error=str(exc))
        return None


def listen(registry: CollectorRegistry, entry: Host) -> WSGIServer | None:
    """As `serve`, raising OSError when the address or port cannot be bound."""
    if entry.metrics_port == NO_EXPORTER:
        return None
    server, _ = start_http_server(entry.metrics_port, bind_address(entry.metrics_address), registry)
    log.info("metrics.listening", **where(entry))
    return server


def where(entry: Host) -> dict[str, object]:
    return {"address": entry.metrics_address, "port": entry.metrics_port}


def start_exporter(rt: Runtime) -> None:
    """Serve the runtime's registry, once per process: a keeper duty (worker/keeper.py), so a
    port held by the worker this one replaces (still draining beside it) is taken as soon as
    that one exits. A failure is said once per distinct error, not every tick."""
    if rt.metrics is None or rt.metrics_server is not None:
        return
    entry = rt.registry_entry
    try:
        rt.metrics_server = listen(rt.metrics.registry, entry)
    except OSError as exc:
        if str(exc) != rt.metrics_problem:
            log.error("metrics.unavailable", **where(entry), error=str(exc))
        rt.metrics_problem = str(exc)


def host_snapshot(
    r: redis.Redis, host: str, limits: HostLimits, report: dict[str, object]
) -> HostSnapshot:
    """The host gauges' figures: the report's, and slots and maintenance in one pipelined
    read (left out when Redis does not answer)."""
    try:
        load = host_load(r, host)
        held: dict[str, int] | None = {"out": load.slots_out, "in": load.slots_in}
        maintenance: bool | None = load.maintenance
    except redis.RedisError:
        held, maintenance = None, None
    free = report.get("free_mib")
    running = report.get("running")
    return HostSnapshot(
        libvirtd_up="error" not in report,
        free_mib=free if isinstance(free, int) else None,
        running=len(running) if isinstance(running, list) else None,
        slots_held=held,
        slots_limit={"out": limits.max_outbound, "in": limits.max_inbound},
        maintenance=maintenance,
    )


def cache_host(rt: Runtime, report: dict[str, object]) -> None:
    """Leave what the report tick saw for the host gauges (worker/metrics_host.py)."""
    rt.host_snapshot = host_snapshot(rt.store.r, rt.host, rt.registry_entry.limits, report)
