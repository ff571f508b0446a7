"""The host gauges of a worker's exporter, from what the keeper's report tick last saw.

A scrape must cost next to nothing and never wait: no libvirt call (a hung libvirtd would
hang the scrape) and no Redis read. The report tick (worker/keeper.py, every heartbeat
interval) already reads libvirt and Redis for `drover hosts`; it leaves a `HostSnapshot` on
the runtime, and this collector turns the latest one into gauges. Before the first tick only
`drover_worker_up` is there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from config.metrics import PREFIX

BYTES_PER_MIB = 1024 * 1024
DIRECTIONS = ("in", "out")


@dataclass(frozen=True)
class HostSnapshot:
    """The host as the last report tick saw it (None: that part could not be read)."""

    libvirtd_up: bool
    free_mib: int | None  # room for guests as placement sees it
    running: int | None  # guests running on the host
    slots_held: dict[str, int] | None  # direction -> migrations holding a slot
    slots_limit: dict[str, int]  # direction -> the registry's limit
    maintenance: bool | None


def _gauge(name: str, help_text: str, host: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=["host"])
    family.add_metric([host], value)
    return family


class HostCollector(Collector):
    def __init__(self, host: str, latest: Callable[[], HostSnapshot | None]) -> None:
        self.host = host
        self.latest = latest

    def collect(self) -> Iterator[Metric]:
        host = self.host
        yield _gauge(f"{PREFIX}worker_up", "1 while the host's worker serves.", host, 1)
        snap = self.latest()
        if snap is None:
            return
        maintenance = None if snap.maintenance is None else int(snap.maintenance)
        free = None if snap.free_mib is None else snap.free_mib * BYTES_PER_MIB
        gauges: tuple[tuple[str, str, float | None], ...] = (
            ("host_libvirtd_up", "1 when the worker's last look at libvirtd succeeded.",
             int(snap.libvirtd_up)),
            ("host_maintenance", "1 while the host is in maintenance (never a destination).",
             maintenance),
            ("host_free_memory_bytes",
             "Room for guests as placement sees it (free, reserved and the limit counted).",
             free),
            ("host_running_guests", "Guests running on the host.", snap.running),
        )  # fmt: skip
        for name, help_text, value in gauges:
            if value is not None:  # a part the tick could not read is left out, not zero
                yield _gauge(f"{PREFIX}{name}", help_text, host, value)
        yield from self._slots(snap)

    def _slots(self, snap: HostSnapshot) -> Iterator[Metric]:
        labels = ["host", "direction"]
        limit = GaugeMetricFamily(
            f"{PREFIX}host_slots_limit", "Migrations the host may run at once.", labels=labels
        )
        for direction in DIRECTIONS:
            limit.add_metric([self.host, direction], snap.slots_limit[direction])
        yield limit
        if snap.slots_held is None:
            return
        held = GaugeMetricFamily(
            f"{PREFIX}host_slots_held", "Migration slots of the host held now.", labels=labels
        )
        for direction in DIRECTIONS:
            held.add_metric([self.host, direction], snap.slots_held[direction])
        yield held
