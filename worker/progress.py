"""One sample of a running migration, as libvirt's job statistics give it.

Pure (no libvirt import): the monitor makes samples, the convergence policy judges them, the
events carry them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

# What the migration is doing, as far as the source can tell:
#   setup       no statistics yet (the destination is starting QEMU)
#   transfer    pre-copy: memory is copied while the guest runs on the source
#   postcopy    the guest runs on the destination; the rest is pulled from the source
#   completing  the switch-over: the guest paused by the migration, or the job just ended
Stage = Literal["setup", "transfer", "postcopy", "completing"]
STAGE_ORDER: tuple[Stage, ...] = ("setup", "transfer", "postcopy", "completing")

DEFAULT_PAGE_SIZE = 4096  # bytes; what libvirt reports on x86 when it reports nothing


@dataclass(frozen=True)
class Progress:
    """One sample of libvirt's migration job statistics (bytes, bytes/s, pages/s, ms)."""

    stage: Stage
    time_elapsed_ms: int
    data_total: int
    data_processed: int
    data_remaining: int
    memory_bandwidth: int
    memory_dirty_rate: int
    memory_iteration: int
    downtime_ms: int | None
    disk_total: int = 0
    disk_remaining: int = 0
    memory_page_size: int = DEFAULT_PAGE_SIZE
    auto_converge_throttle: int = 0  # percent of vCPU time QEMU's auto-converge takes away
    postcopy_requests: int = 0  # pages the destination asked for during post-copy

    @classmethod
    def from_stats(cls, stats: dict[str, Any], stage: Stage = "transfer") -> Progress:
        return cls(
            stage=stage,
            time_elapsed_ms=int(stats.get("time_elapsed", 0)),
            data_total=int(stats.get("data_total", 0)),
            data_processed=int(stats.get("data_processed", 0)),
            data_remaining=int(stats.get("data_remaining", 0)),
            memory_bandwidth=int(stats.get("memory_bps", 0)),
            memory_dirty_rate=int(stats.get("memory_dirty_rate", 0)),
            memory_iteration=int(stats.get("memory_iteration", 0)),
            downtime_ms=int(stats["downtime"]) if "downtime" in stats else None,
            disk_total=int(stats.get("disk_total", 0)),
            disk_remaining=int(stats.get("disk_remaining", 0)),
            memory_page_size=int(stats.get("memory_page_size", 0)) or DEFAULT_PAGE_SIZE,
            auto_converge_throttle=int(stats.get("auto_converge_throttle", 0)),
            postcopy_requests=int(stats.get("memory_postcopy_requests", 0)),
        )

    @classmethod
    def waiting(cls, stage: Stage, elapsed_ms: int, last: Progress | None) -> Progress:
        """No fresh figures: before the transfer starts, or while libvirt switches over."""
        if last is None:
            return cls(stage, elapsed_ms, 0, 0, 0, 0, 0, 0, None)
        return replace(last, stage=stage, time_elapsed_ms=max(elapsed_ms, last.time_elapsed_ms))

    @property
    def dirty_bytes_per_s(self) -> int:
        """libvirt gives the dirty rate in pages per second."""
        return self.memory_dirty_rate * self.memory_page_size

    def as_event_fields(self) -> dict[str, Any]:
        return asdict(self)
