"""How often the monitor asks libvirt for its statistics (worker/monitor.py).

Told of each pass's end by libvirt's migration-iteration event, it asks then (and once per
report) and decides at once; without that event it asks every tick. The domain here is a
scripted stand-in for jobStats: these tests count calls, the lab tests judge migrations.
"""

from __future__ import annotations

import threading
from typing import Any

import libvirt
import pytest
from structlog.testing import capture_logs

from config.policy_model import BUILTIN_POLICIES
from tests.support.lab_fixtures import wait_for
from tests.support.libvirt_errors import libvirt_error
from worker.convergence import ConvergenceEngine, Decision
from worker.monitor import MigrationMonitor
from worker.steering import Action

MIB = 1024 * 1024


class ScriptedDomain:
    """jobStats of a guest that re-dirties 64 MiB a pass at 8 MiB/s; `iteration` moves on
    when the test says a pass ended."""

    def __init__(self) -> None:
        self.calls = 0
        self.iteration = 1
        self.elapsed_ms = 100
        self.shown = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)

    def state(self) -> tuple[int, int]:
        """What libvirt shows the guest as (virDomainGetState): running, until a test says."""
        return self.shown

    def jobStats(self) -> dict[str, Any]:
        self.calls += 1
        self.elapsed_ms += 8000 if self.iteration > 1 else 0
        return {
            "type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
            "time_elapsed": self.elapsed_ms,
            "data_total": 128 * MIB,
            "data_remaining": 64 * MIB,
            "memory_bps": 8 * MIB,
            "memory_iteration": self.iteration,
        }


def monitor(dom: ScriptedDomain, decided: list[Decision], **kw: Any) -> MigrationMonitor:
    engine = ConvergenceEngine(BUILTIN_POLICIES["default"], 128, 1800)

    def carried_out(decision: Decision) -> bool:
        decided.append(decision)
        return True

    return MigrationMonitor(
        dom,  # type: ignore[arg-type,unused-ignore]
        interval=3600,  # one report, at the start: what remains is the event's doing
        decision_interval=0.01,
        engine=engine,
        on_progress=lambda _: None,
        on_action=lambda _: None,
        on_decision=carried_out,
        **kw,
    )


def test_told_of_passes_it_asks_libvirt_only_when_one_ends() -> None:
    dom, finished = ScriptedDomain(), threading.Event()
    decided: list[Decision] = []
    pass_ended = threading.Event()
    m = monitor(dom, decided, pass_ended=pass_ended)
    runner = threading.Thread(target=m.run, args=(finished,))
    runner.start()
    try:
        wait_for(lambda: [d.action for d in decided] == ["set_downtime"], 5, "the first sample")
        calls = dom.calls
        threading.Event().wait(0.2)  # twenty ticks with no pass ending
        assert dom.calls == calls
        dom.iteration = 2
        pass_ended.set()
        wait_for(lambda: len(decided) == 2, 5, "the decision at the pass's end")
        assert decided[1].action == "postcopy" and decided[1].trigger == "not_converging"
        assert dom.calls == calls + 1
    finally:
        finished.set()
        runner.join()


def test_without_the_event_it_asks_every_tick() -> None:
    dom, finished = ScriptedDomain(), threading.Event()
    decided: list[Decision] = []
    m = monitor(dom, decided)
    runner = threading.Thread(target=m.run, args=(finished,))
    runner.start()
    try:
        wait_for(lambda: dom.calls >= 5, 5, "five samples")
    finally:
        finished.set()
        runner.join()
    assert [d.action for d in decided] == ["set_downtime"]


POSTCOPY_SHOWN = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY)
USER_PAUSED = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)
MIGRATION_PAUSED = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION)


def steered(dom: ScriptedDomain, decided: list[Decision], stages: list[str], **kw: Any) -> Any:
    """A policy's monitor (pass ends told by event) reporting each stage into `stages`."""
    m = monitor(dom, decided, **kw)
    m.interval = 0.02
    m.on_progress = lambda p: stages.append(p.stage)
    return m


def started(m: MigrationMonitor, finished: threading.Event, decided: list[Decision]) -> Any:
    """`m` watching on a thread of its own, once it has made the policy's first decision."""
    runner = threading.Thread(target=m.run, args=(finished,))
    runner.start()
    try:
        wait_for(lambda: [d.action for d in decided] == ["set_downtime"], 5, "the first sample")
    except BaseException:
        finished.set()
        runner.join()
        raise
    return runner


def test_a_switch_to_post_copy_made_by_the_operator_is_libvirts_word_for_the_watch() -> None:
    """A probe's operator switched with `drover postcopy`: the monitor went on reporting
    `transfer`, and the policy later tried to abort (refused) or suspend a guest already
    running on the destination. libvirt shows the switch: the policy takes no step."""
    dom, finished = ScriptedDomain(), threading.Event()
    decided: list[Decision] = []
    stages: list[str] = []
    pass_ended = threading.Event()
    m = steered(dom, decided, stages, pass_ended=pass_ended)
    runner = started(m, finished, decided)
    try:
        dom.shown = POSTCOPY_SHOWN  # the operator's switch, made by another task
        dom.iteration = 2  # a pass that would make the policy switch (or abort) itself
        pass_ended.set()
        wait_for(lambda: stages[-1:] == ["postcopy"], 5, "a post-copy report")
        threading.Event().wait(0.1)
    finally:
        finished.set()
        runner.join()
    assert [d.action for d in decided] == ["set_downtime"]
    assert m.postcopy and "transfer" not in stages[stages.index("postcopy") :]


def test_after_the_operators_pause_the_policy_stands_down_but_the_hard_limit_holds() -> None:
    """force-complete paused the guest; the policy's completion timeout then aborted the
    migration and resumed the guest on the source (probe). Now the policy stands down, said
    once; the fleet's migration_timeout still ends a migration that never arrives."""
    dom, finished = ScriptedDomain(), threading.Event()
    decided: list[Decision] = []
    stages: list[str] = []
    m = steered(dom, decided, stages)
    m.engine.max_duration_s = 20  # the fleet's limit: three passes of this guest
    runner = threading.Thread(target=m.run, args=(finished,))
    with capture_logs() as logs:
        runner.start()
        try:
            wait_for(lambda: [d.action for d in decided] == ["set_downtime"], 5, "a sample")
            wait_for(lambda: len(stages) >= 2, 5, "a report")
            dom.shown = USER_PAUSED  # the operator's force-complete
            wait_for(lambda: m.stood_down, 5, "the policy to stand down")
            dom.iteration = 2  # passes that would make the policy switch to post-copy
            wait_for(lambda: len(decided) == 2, 5, "the hard limit")
        finally:
            finished.set()
            runner.join()
    assert [(d.action, d.trigger) for d in decided[1:]] == [("abort", "hard_limit")]
    said = [log for log in logs if log["event"] == "policy.stood_down"]
    assert len(said) == 1 and "force-complete" in said[0]["reason"]


@pytest.mark.parametrize("how", ["user-before", "switch-over"])
def test_a_pause_that_is_no_finish_keeps_the_policy(how: str) -> None:
    """Paused by its owner before the move (not a force-complete), or libvirt's own stop for
    the switch-over, which also shows as paused by the migration, without this worker's word
    that it paused the guest to finish: the policy the operator chose still acts."""
    dom, finished = ScriptedDomain(), threading.Event()
    if how == "user-before":
        dom.shown = USER_PAUSED
    decided: list[Decision] = []
    stages: list[str] = []
    pass_ended = threading.Event()
    m = steered(dom, decided, stages, pass_ended=pass_ended, paused_to_finish=lambda: False)
    runner = started(m, finished, decided)
    try:
        if how == "switch-over":
            dom.shown = MIGRATION_PAUSED
        dom.iteration = 2
        pass_ended.set()
        wait_for(lambda: len(decided) == 2, 5, "the policy's step at the pass's end")
    finally:
        finished.set()
        runner.join()
    assert decided[1].action == "postcopy" and not m.stood_down


def reporting(dom: ScriptedDomain, stages: list[str], **kw: Any) -> MigrationMonitor:
    """A monitor without a policy that notes the stage of each report in `stages`."""
    return MigrationMonitor(
        dom,  # type: ignore[arg-type,unused-ignore]
        decision_interval=0.01,
        engine=None,
        on_progress=lambda p: stages.append(p.stage),
        on_action=lambda _: None,
        **kw,
    )


class SlowDomain(ScriptedDomain):
    """A loaded libvirtd: jobStats answers once, then not until `answer` is set; state() says
    what the test puts in `paused_by_migration`, as virDomainGetState answers while
    jobStats waits."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = threading.Event()
        self.paused_by_migration = False

    def jobStats(self) -> dict[str, Any]:
        if self.calls:
            self.answer.wait(10)
        return super().jobStats()

    def state(self) -> tuple[int, int]:
        if self.paused_by_migration:
            return libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION
        return libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED


def test_a_late_answer_keeps_the_stage_until_the_switch_over_and_stages_only_go_forward() -> None:
    """CI saw a loaded host's slow jobStats reported as `completing` mid-transfer; and, once
    that was fixed, `completing` then `transfer`: the sample asked before the pause (or the
    figures of the last pages sent while the guest is paused) answered after the switch-over
    was reported."""
    dom, finished = SlowDomain(), threading.Event()
    stages: list[str] = []
    m = reporting(dom, stages, interval=0.02)
    runner = threading.Thread(target=m.run, args=(finished,))
    runner.start()
    try:
        wait_for(lambda: len(stages) >= 5, 5, "reports while libvirt is late")
        assert set(stages) == {"transfer"}, stages
        dom.paused_by_migration = True
        wait_for(lambda: stages[-1] == "completing", 5, "a report of the switch-over")
        seen = len(stages)
        dom.answer.set()  # libvirt answers with figures again
        wait_for(lambda: dom.calls >= 3 and len(stages) >= seen + 5, 5, "answered reports")
    finally:
        finished.set()
        dom.answer.set()
        runner.join()
    first = stages.index("completing")
    assert set(stages[first:]) == {"completing"}, stages


class RefusingDomain(ScriptedDomain):
    """jobStats as a busy libvirtd answers a re-attached watch: figures, then `refusals`
    job-lock timeouts, then figures again, then no job (the migration ended)."""

    def __init__(self, refusals: int, ended_with: libvirt.libvirtError | None) -> None:
        super().__init__()
        self.refusals = refusals
        self.ended_with = ended_with
        self.asked = 0

    def jobStats(self) -> dict[str, Any]:
        self.asked += 1
        if 1 < self.asked <= 1 + self.refusals:
            raise libvirt_error(
                libvirt.VIR_ERR_OPERATION_TIMEOUT,
                "Timed out during operation: cannot acquire state change lock",
                libvirt.VIR_FROM_QEMU,
            )
        if self.asked <= 2 + self.refusals:
            return super().jobStats()
        if self.ended_with is not None:
            raise self.ended_with
        return {"type": libvirt.VIR_DOMAIN_JOB_NONE}

    def state(self) -> tuple[int, int]:
        return libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED


def watched_until_idle(dom: RefusingDomain) -> list[str]:
    """The stages a re-attached watch reports, once it returned by itself."""
    stages: list[str] = []
    m = reporting(dom, stages, interval=0.01, until_idle=True)
    finished = threading.Event()  # never set: only libvirt's "no job" ends this watch
    runner = threading.Thread(target=m.run, args=(finished,))
    runner.start()
    runner.join(10)
    assert not runner.is_alive(), "the watch did not end once libvirt showed no job"
    return stages


def test_a_refused_sample_does_not_end_a_watch_libvirt_still_runs() -> None:
    """A re-attached watch ended at libvirt's first refusal would have the job failed (and
    its destination rolled back) under a migration libvirt goes on with."""
    dom = RefusingDomain(refusals=5, ended_with=None)
    stages = watched_until_idle(dom)
    assert dom.asked == 1 + 5 + 2  # figures, 5 refusals, figures again, then no job
    assert "completing" not in stages[:-1] and stages[0] == "transfer", stages


def test_a_domain_gone_or_shut_off_or_a_daemon_away_ends_the_watch() -> None:
    """What recovery does next asks libvirt again (and retries a daemon that is away)."""
    ended = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_RPC)
    for code in ended:
        dom = RefusingDomain(
            refusals=0, ended_with=libvirt_error(code, "gone", libvirt.VIR_FROM_QEMU)
        )
        watched_until_idle(dom)
        assert dom.asked == 3


def test_an_abort_asked_between_reports_comes_before_a_switch_to_post_copy() -> None:
    """The abort is read at each report (here only the first); the policy decides at a pass's
    end. An abort accepted since must be carried out instead of the switch, which would make
    it impossible (a post-copy cannot be aborted)."""
    dom, finished = ScriptedDomain(), threading.Event()
    decided: list[Decision] = []
    actions: list[Action] = []
    asked: list[str] = []
    pass_ended = threading.Event()
    m = monitor(
        dom, decided, pass_ended=pass_ended, abort_requested=lambda: asked[-1] if asked else None
    )
    m.on_action = actions.append
    runner = threading.Thread(target=m.run, args=(finished,))
    runner.start()
    try:
        wait_for(lambda: [d.action for d in decided] == ["set_downtime"], 5, "the first sample")
        asked.append("aborted by operator@host")
        dom.iteration = 2
        pass_ended.set()
        wait_for(lambda: bool(actions), 5, "the abort to be carried out")
    finally:
        finished.set()
        runner.join()
    assert [d.action for d in decided] == ["set_downtime"]  # no switch to post-copy
    assert [(a.kind, a.reason) for a in actions] == [("cancel", "aborted by operator@host")]


class SwitchingOverDomain(SlowDomain):
    """libvirt during a switch-over as the lab showed it: virDomainGetState waits with the
    statistics too (0.66 s per migration there), until `answer` is set."""

    def state(self) -> tuple[int, int]:
        if self.paused_by_migration:
            self.answer.wait(10)
        return super().state()


def test_a_late_report_of_the_switch_over_goes_by_libvirts_events_without_waiting() -> None:
    """The report loop asked libvirt for the guest's state when a sample was late, and waited
    as long as libvirt held its answers back: no report, no abort check meanwhile. Told of
    libvirt's pause by its events, it asks nothing, and reports at its pace."""
    dom, finished = SwitchingOverDomain(), threading.Event()
    stages: list[str] = []
    announced = threading.Event()
    m = reporting(dom, stages, interval=0.02, paused=announced.is_set)
    runner = threading.Thread(target=m.run, args=(finished,))
    runner.start()
    try:
        wait_for(lambda: len(stages) >= 5, 5, "reports while libvirt is late")
        dom.paused_by_migration = True
        announced.set()  # libvirt's lifecycle event of the pause
        wait_for(lambda: stages[-1] == "completing", 5, "a report of the switch-over")
        seen = len(stages)
        wait_for(lambda: len(stages) >= seen + 5, 5, "reports while libvirt holds back")
    finally:
        finished.set()
        dom.answer.set()
        runner.join()
    first = stages.index("completing")
    assert set(stages[:first]) == {"transfer"} and set(stages[first:]) == {"completing"}


@pytest.mark.parametrize("shown", ["user", "migration"])
def test_a_watch_reattached_to_a_paused_migration_stands_down(shown: str) -> None:
    """Probe: force-complete paused the guest, the worker restarted, and the re-attached
    watch took the pause for one from before the migration: its policy's completion timeout
    aborted the move and resumed the guest on the source. Re-attached, a pause found is this
    migration's: the policy stands down before its first step, said once. libvirt shows a
    guest paused mid-migration as paused by its migration (the lab): the ledger's word that
    this worker paused it to finish counts."""
    dom, finished = ScriptedDomain(), threading.Event()
    dom.shown = USER_PAUSED if shown == "user" else MIGRATION_PAUSED
    decided: list[Decision] = []
    stages: list[str] = []
    m = steered(dom, decided, stages, until_idle=True, paused_to_finish=lambda: True)
    runner = threading.Thread(target=m.run, args=(finished,))
    with capture_logs() as logs:
        runner.start()
        try:
            wait_for(lambda: m.stood_down, 5, "the policy to stand down")
            dom.iteration = 2
            wait_for(lambda: len(stages) >= 3, 5, "reports after it")
        finally:
            finished.set()
            runner.join()
    assert decided == []  # not even the policy's downtime at the start
    said = [log for log in logs if log["event"] == "policy.stood_down"]
    assert len(said) == 1


def test_the_stand_down_is_said_when_the_step_it_stops_is_the_policys_last() -> None:
    """Probe: after force-complete the policy's terminal step (here the switch at a pass's
    end) was held back, but no `policy.stood_down` was said: the decision had finished the
    policy before the look that found the pause."""
    dom, finished = ScriptedDomain(), threading.Event()
    decided: list[Decision] = []
    stages: list[str] = []
    pass_ended = threading.Event()
    m = steered(dom, decided, stages, pass_ended=pass_ended)
    with capture_logs() as logs:
        runner = started(m, finished, decided)
        try:
            wait_for(lambda: len(stages) >= 2, 5, "a report")
            dom.shown = USER_PAUSED  # the operator's force-complete
            dom.iteration = 2  # a pass whose end makes the policy switch: its last step
            pass_ended.set()
            wait_for(lambda: m.stood_down, 5, "the policy to stand down")
        finally:
            finished.set()
            runner.join()
    assert [d.action for d in decided] == ["set_downtime"]  # the switch is not made
    said = [log for log in logs if log["event"] == "policy.stood_down"]
    assert len(said) == 1
