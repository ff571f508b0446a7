"""What a host holds against its limits and whether it is in maintenance: one round trip.

Read by the worker's report tick (worker/keeper.py) for its exporter's host gauges, so that a
scrape itself reads no Redis at all (docs/metrics.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from jobs.keys import DISABLED_HOSTS, inbound_gate, outbound_gate


@dataclass(frozen=True)
class HostLoad:
    slots_out: int  # migrations holding an outbound slot of the host
    slots_in: int
    maintenance: bool


def host_load(r: redis.Redis, host: str) -> HostLoad:
    with r.pipeline(transaction=False) as p:
        p.scard(outbound_gate(host))
        p.scard(inbound_gate(host))
        p.hexists(DISABLED_HOSTS, host)
        out, inbound, disabled = p.execute()
    return HostLoad(int(out), int(inbound), bool(disabled))
