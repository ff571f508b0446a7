"""Watching a running migration: sample libvirt's job statistics on a fixed interval.

The loop only observes and reports; what to do about what it sees (abort, switch mode) is
the policy's business (worker/convergence.py), in the manner of KubeVirt's migration monitor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import libvirt

from worker.convergence import Action, ConvergencePolicy


@dataclass(frozen=True)
class Progress:
    """One sample of libvirt's migration job statistics (bytes, bytes/s, pages/s, ms)."""

    time_elapsed_ms: int
    data_total: int
    data_processed: int
    data_remaining: int
    memory_bandwidth: int
    memory_dirty_rate: int
    memory_iteration: int
    downtime_ms: int | None

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> Progress:
        return cls(
            time_elapsed_ms=int(stats.get("time_elapsed", 0)),
            data_total=int(stats.get("data_total", 0)),
            data_processed=int(stats.get("data_processed", 0)),
            data_remaining=int(stats.get("data_remaining", 0)),
            memory_bandwidth=int(stats.get("memory_bandwidth", 0)),
            memory_dirty_rate=int(stats.get("memory_dirty_rate", 0)),
            memory_iteration=int(stats.get("memory_iteration", 0)),
            downtime_ms=int(stats["downtime"]) if "downtime" in stats else None,
        )

    def as_event_fields(self) -> dict[str, Any]:
        return asdict(self)


def sample(dom: libvirt.virDomain) -> Progress | None:
    """The current migration statistics, or None when no job runs (not started, or over)."""
    try:
        stats = dom.jobStats()
    except libvirt.libvirtError:
        return None
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    return Progress.from_stats(stats)


class MigrationMonitor:
    def __init__(
        self,
        dom: libvirt.virDomain,
        *,
        interval: float,
        policy: ConvergencePolicy,
        on_progress: Callable[[Progress], None],
        on_action: Callable[[Action], None],
    ) -> None:
        self.dom = dom
        self.interval = interval
        self.policy = policy
        self.on_progress = on_progress
        self.on_action = on_action
        self.last: Progress | None = None

    def run(self, finished: threading.Event) -> None:
        """Sample until `finished` is set (the migration call returned)."""
        while not finished.wait(self.interval):
            progress = sample(self.dom)
            if progress is None:
                continue
            self.last = progress
            self.on_progress(progress)
            action = self.policy.decide(progress)
            if action.kind != "continue":
                self.on_action(action)
