"""Watching a running migration: sample libvirt's job statistics on a fixed interval.

The loop only observes and reports; what to do about what it sees (abort, switch mode) is
the policy's business (worker/convergence.py), in the manner of KubeVirt's migration monitor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, replace
from typing import Any

from config.events import get_logger
from worker.convergence import CONTINUE, Action, ConvergencePolicy
from worker.libvirt_host import Domain, migration_stats

log = get_logger()

MS_PER_S = 1000


@dataclass(frozen=True)
class Progress:
    """One sample of libvirt's migration job statistics (bytes, bytes/s, pages/s, ms)."""

    stage: str
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

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> Progress:
        return cls(
            stage="transfer",
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
        )

    @classmethod
    def waiting(cls, stage: str, elapsed_ms: int, last: Progress | None) -> Progress:
        """No fresh figures: before the transfer starts, or while libvirt switches over."""
        if last is None:
            return cls(stage, elapsed_ms, 0, 0, 0, 0, 0, 0, None)
        return replace(last, stage=stage, time_elapsed_ms=max(elapsed_ms, last.time_elapsed_ms))

    def as_event_fields(self) -> dict[str, Any]:
        return asdict(self)


def sample(dom: Domain) -> dict[str, Any] | None:
    """libvirt's statistics of the running migration, or None while there is no job."""
    return migration_stats(dom)


class MigrationMonitor:
    """Reports once per interval, even while libvirt holds the statistics back.

    During switch-over libvirt answers `jobStats` only when the job's phase allows it, which
    can take seconds; sampling runs on its own thread so the reports keep their pace and say
    that the migration is completing.

    The operator's abort request lives in Redis, which may be away while libvirt migrates:
    a check that cannot be made counts as no new request (said once, in an event), and the
    monitor goes on with its reports and the policy, checking again on the next tick.
    """

    def __init__(
        self,
        dom: Domain,
        *,
        interval: float,
        policy: ConvergencePolicy,
        on_progress: Callable[[Progress], None],
        on_action: Callable[[Action], None],
        abort_requested: Callable[[], str | None] = lambda: None,
        drain: Callable[[], Action] = lambda: CONTINUE,
        until_idle: bool = False,
    ) -> None:
        self.dom = dom
        self.interval = interval
        self.policy = policy
        self.on_progress = on_progress
        self.on_action = on_action
        self.abort_requested = abort_requested
        self.drain = drain
        # Watching a migration this process did not start (recovery re-attached to it): it
        # is over once libvirt shows no job, as nothing else will say so.
        self.until_idle = until_idle
        self.last: Progress | None = None
        self.cancelled = False
        # Set when the worker's warm shutdown handed the migration over: the loop stops
        # watching a migration libvirtd goes on with (convergence.drain_action).
        self.handed_over: Action | None = None
        self.abort_check_failing = False

    def run(self, finished: threading.Event) -> None:
        """Sample until `finished` is set (the migration call returned), or with `until_idle`
        until libvirt shows no migration job; one report a tick."""
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstats") as pool:
            pending: Future[dict[str, Any] | None] | None = None
            # Half the interval waiting, at most half for the sample: a report every interval.
            half = self.interval / 2
            while not finished.wait(half):
                verdict = self.drain()
                if verdict.kind == "handover":
                    self.handed_over = verdict
                    return
                if verdict.kind != "continue" and not self.cancelled:
                    self.cancelled = True
                    self.on_action(verdict)
                if not self.cancelled and (reason := self._abort_reason()):
                    self.cancelled = True
                    self.on_action(Action("cancel", reason))
                if pending is None:
                    pending = pool.submit(sample, self.dom)
                try:
                    stats = pending.result(timeout=half)
                except FutureTimeout:
                    stats = None
                    stage = "completing" if self.last else "setup"
                else:
                    pending = None
                    if stats is None and self.until_idle:
                        return
                    stage = "transfer" if stats else ("completing" if self.last else "setup")
                if stats is None:
                    elapsed_ms = int((time.monotonic() - started) * MS_PER_S)
                    self.on_progress(Progress.waiting(stage, elapsed_ms, self.last))
                    continue
                progress = Progress.from_stats(stats)
                self.last = progress
                self.on_progress(progress)
                action = self.policy.decide(progress)
                if action.kind != "continue":
                    self.on_action(action)

    def _abort_reason(self) -> str | None:
        """The operator's abort request, or None, also when it cannot be read just now."""
        try:
            reason = self.abort_requested()
        except Exception as exc:  # Redis away: the migration must stay watched regardless
            if not self.abort_check_failing:
                self.abort_check_failing = True
                log.warning("migration.abort_check_failed", error=str(exc))
            return None
        if self.abort_check_failing:
            self.abort_check_failing = False
            log.info("migration.abort_check_restored")
        return reason
