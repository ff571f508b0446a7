"""Watching a running migration: sample libvirt's job statistics, report, let the policy judge.

The loop only observes and reports; what to do about what it sees (raise the downtime, switch
to post-copy, abort) is the policy's business (worker/convergence.py), carried out by the
watch (worker/migration_watch.py), in the manner of KubeVirt's migration monitor. It samples
every `decision_interval` so a decision follows libvirt's figures within a fraction of a
second, and reports every `interval`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Any

from config.events import get_logger
from worker.convergence import HARD_LIMIT, ConvergenceEngine, Decision
from worker.libvirt_host import Domain, LibvirtError
from worker.libvirt_states import (
    StatsUnanswered,
    migration_stats,
    paused_by_user,
    paused_for_switchover,
    state_reason,
)
from worker.progress import STAGE_ORDER, Stage
from worker.progress import Progress as Progress
from worker.steering import CONTINUE, Action

log = get_logger()

MS_PER_S = 1000


class MigrationMonitor:
    """Samples every tick and reports once per interval, even while libvirt holds the
    statistics back.

    During switch-over libvirt answers `jobStats` only when the job's phase allows it, which
    can take seconds; sampling runs on its own thread so the reports keep their pace. A late
    answer is not by itself a switch-over (a loaded libvirtd is late at any stage): the
    report says `completing` only when libvirt shows the guest paused by the migration.

    The operator's abort request lives in Redis, which may be away while libvirt migrates:
    a check that cannot be made counts as no new request (said once, in an event), and the
    monitor goes on with its reports and the policy, checking again at the next report.
    """

    def __init__(
        self,
        dom: Domain,
        *,
        interval: float,
        engine: ConvergenceEngine | None,
        on_progress: Callable[[Progress], None],
        on_action: Callable[[Action], None],
        on_decision: Callable[[Decision], bool] = lambda _: True,
        abort_requested: Callable[[], str | None] = lambda: None,
        drain: Callable[[], Action] = lambda: CONTINUE,
        until_idle: bool = False,
        decision_interval: float | None = None,
        postcopy: bool = False,
        pass_ended: threading.Event | None = None,
        paused: Callable[[], bool] | None = None,
        paused_to_finish: Callable[[], bool] = lambda: False,
    ) -> None:
        self.dom = dom
        self.interval = interval
        self.tick = min(decision_interval or interval, interval)
        self.engine = engine
        self.on_progress = on_progress
        self.on_action = on_action
        self.on_decision = on_decision
        self.abort_requested = abort_requested
        self.drain = drain
        # Watching a migration this process did not start (recovery re-attached to it): it
        # is over once libvirt shows no job, as nothing else will say so.
        self.until_idle = until_idle
        self.postcopy = postcopy  # the guest already runs on the destination
        # libvirt's end-of-pass event, when it is delivered (worker/libvirt_events.py): then
        # libvirt is asked for its statistics at each pass's end and once per report only,
        # as virsh's --postcopy-after-precopy is told of the pass; otherwise every tick.
        self.pass_ended = pass_ended
        # The guest paused, for a late report: libvirt's events, else libvirt asked (which
        # held the report loop 0.66 s per migration on the lab, answering after the switch).
        self.paused = paused or (lambda: paused_for_switchover(dom))
        self.last: Progress | None = None
        self.reached: Stage = "setup"  # the furthest stage reported: stages only go forward
        self.cancelled = False
        # Set when the worker's warm shutdown handed the migration over: the loop stops
        # watching a migration libvirtd goes on with (convergence.drain_action).
        self.handed_over: Action | None = None
        self.abort_check_failing = False
        self.unanswered = False
        # Paused by someone (`virsh suspend`) before this watch began: the policy goes on.
        self.paused_before: bool | None = None
        self.stood_down = False  # the operator's force-complete paused the guest
        self.paused_to_finish = paused_to_finish

    def run(self, finished: threading.Event) -> None:
        """Sample until `finished` is set (the migration call returned), or with `until_idle`
        until libvirt shows no migration job; a report every interval."""
        started = time.monotonic()
        reported = float("-inf")
        self._look()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstats") as pool:
            pending: Future[dict[str, Any] | None] | None = None
            # Half a tick waiting, at most half for the sample.
            half = self.tick / 2
            while not finished.wait(half):
                due = time.monotonic() - reported >= self.interval
                if due and self._steered():
                    return
                if pending is None and not (due or self._pass_ended()):
                    continue  # told of passes: nothing to ask libvirt between them
                if pending is None and self.postcopy and self.pass_ended is not None:
                    # Post-copy, followed by events: nothing left to decide, and libvirt is
                    # not asked while it completes (reports repeat the last figures).
                    if due:
                        reported = time.monotonic()
                        elapsed_ms = int((time.monotonic() - started) * MS_PER_S)
                        waiting = Progress.waiting("postcopy", elapsed_ms, self.last)
                        self.on_progress(self._forward(waiting))
                    continue
                if pending is None:
                    # (its state beside the figures: a slow answer never holds reports)
                    pending = pool.submit(self._sample, due)
                try:
                    stats = pending.result(timeout=half)
                except (FutureTimeout, StatsUnanswered) as exc:
                    if isinstance(exc, StatsUnanswered):
                        pending = None  # asked again at the next tick
                        self._unanswered(exc)
                    if due:  # no figures this time: the report says why, the figures wait
                        reported = time.monotonic()
                        self.on_progress(self._late(started))
                    continue
                pending = None
                if stats is None and self.until_idle:
                    return
                progress = self._progress(stats, started)
                if due:
                    reported = time.monotonic()
                    self.on_progress(progress)
                if stats is not None and progress.stage != "setup":
                    self.last = progress
                    self._judge(progress)

    def _sample(self, look: bool) -> dict[str, Any] | None:
        """libvirt's statistics, and (`look`: a report is due) its state of the guest."""
        stats = migration_stats(self.dom)  # None: no job; StatsUnanswered: no word
        if look:
            self._look()
        return stats

    def _pass_ended(self) -> bool:
        """Whether to sample now: a pass just ended, or no end-of-pass event comes here."""
        if self.pass_ended is None or self.engine is None or self.engine.finished:
            return self.pass_ended is None
        if self.pass_ended.is_set():
            self.pass_ended.clear()
            return True
        return False

    def _steered(self) -> bool:
        """The drain's and the operator's say, once per report; True when handed over."""
        verdict = self.drain()
        if verdict.kind == "handover":
            self.handed_over = verdict
            return True
        if verdict.kind != "continue" and not self.cancelled:
            self.cancelled = True
            self.on_action(verdict)
        if not self.cancelled and (reason := self._abort_reason()):
            self.cancelled = True
            self.on_action(Action("cancel", reason))
        return False

    def _unanswered(self, exc: StatsUnanswered) -> None:
        """Said once a migration: libvirt refused the statistics without saying the
        migration ended; the monitor keeps watching (ending here would end a watch whose
        migration libvirt still runs)."""
        if not self.unanswered:
            self.unanswered = True
            log.warning("migration.stats_unanswered", error=str(exc))

    def _late(self, started: float) -> Progress:
        """A report while libvirt has not yet answered for its statistics. A busy host's
        libvirtd is slow to answer at any stage, so lateness alone says nothing: the stage is
        `completing` only while the guest is paused (the switch-over, when libvirt holds the
        figures back), else the stage of the last figures."""
        elapsed_ms = int((time.monotonic() - started) * MS_PER_S)
        if self.postcopy:
            stage: Stage = "postcopy"
        elif self.paused():
            stage = "completing"
        else:
            stage = self.last.stage if self.last else "setup"
        return self._forward(Progress.waiting(stage, elapsed_ms, self.last))

    def _progress(self, stats: dict[str, Any] | None, started: float) -> Progress:
        """The sample as a Progress with its stage; libvirt reports a job before it has
        figures (no memory total yet): that is still setup. No job any more after figures:
        libvirt has ended the transfer and the migration call is returning."""
        if stats is None or not int(stats.get("data_total", 0)):
            stage: Stage = "completing" if self.last else "setup"
            elapsed_ms = int((time.monotonic() - started) * MS_PER_S)
            if stats is not None:
                elapsed_ms = int(stats.get("time_elapsed", elapsed_ms))
            return self._forward(Progress.waiting(stage, elapsed_ms, self.last))
        return self._forward(
            Progress.from_stats(stats, "postcopy" if self.postcopy else "transfer")
        )

    def _forward(self, progress: Progress) -> Progress:
        """The progress at the furthest stage reported so far. Once libvirt showed the
        switch-over, a sample answered afterwards (asked before the pause, or figures of the
        last pages QEMU sends while the guest is paused) is still the switch-over; CI saw
        `completing` followed by `transfer`."""
        if STAGE_ORDER.index(progress.stage) < STAGE_ORDER.index(self.reached):
            return replace(progress, stage=self.reached)
        self.reached = progress.stage
        return progress

    def _judge(self, progress: Progress) -> None:
        if self.engine is None or self.cancelled:
            return
        decision = self.engine.decide(progress)
        if decision is None:
            return
        self._look()  # what libvirt shows now, right before acting on it
        if self.postcopy or (self.stood_down and decision.trigger != HARD_LIMIT):
            return
        if decision.action == "postcopy" and (reason := self._abort_reason()):
            # The operator's abort, asked since the last report, comes first: once switched,
            # a post-copy cannot be aborted, and the accepted abort would turn into a move.
            self.cancelled = True
            self.on_action(Action("cancel", reason))
            return
        done = self.on_decision(decision)
        if done and decision.action == "postcopy":
            # The guest paused for this switch may have been reported as `completing`: the
            # post-copy that follows is the stage now.
            self.postcopy = True
            self.reached = "postcopy"

    def _look(self) -> None:
        """What libvirt shows the guest as, beside the statistics: switched to post-copy by
        someone else than this monitor (the operator's `drover postcopy` or force-complete),
        or paused while it migrates (force-complete, where post-copy is not allowed).

        A probe found the monitor unaware of the operator's switch: it went on asking for
        pre-copy figures, and the policy's completion timeout then tried to abort a post-copy
        (refused) or "paused the guest until it arrives" while it ran on the destination.
        After the operator's pause, the policy's own steps would contradict the operator's
        "finish now" (its completion timeout aborted and resumed the guest on the source):
        the policy stands down, said once; only the fleet's hard limit still applies. libvirt
        shows a guest paused mid-migration as paused by the migration, not by its user: this
        worker's ledger says it paused it to finish (`paused_to_finish`), also for a watch
        re-attached after a restart (`until_idle`), whose policy had aborted such a move."""
        if self.postcopy:
            return
        try:
            found = state_reason(self.dom)
        except LibvirtError:
            return  # no word just now: the statistics and the next look say
        if found.in_postcopy:
            self.postcopy = True
            self.reached = "postcopy"
            return
        paused = paused_by_user(found) or (found.paused and self.paused_to_finish())
        if self.paused_before is None:
            self.paused_before = paused and not self.until_idle
        engine = self.engine
        if paused and not self.paused_before and not self.stood_down and engine is not None:
            self.stood_down = engine.finished = True  # said even when a decision finished it
            log.info(
                "policy.stood_down",
                reason="the guest was paused while it migrates (the operator's force-complete"
                "): the policy takes no further step; the fleet's migration_timeout applies",
            )

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
