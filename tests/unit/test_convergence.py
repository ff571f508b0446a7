"""The convergence policy's decisions, from libvirt-shaped samples (worker/convergence.py).

Each case is a sequence of samples as the monitor would take them (elapsed ms, remaining,
transfer rate, pass), and the test asserts the `policy.step`s that come out: which action,
on which trigger, and which actions were passed over and why.
"""

from __future__ import annotations

import pytest

from config.policy_model import BUILTIN_POLICIES, MigrationPolicy, PolicyAction
from worker.convergence import ConvergenceEngine, Decision
from worker.progress import Progress

MIB = 1024 * 1024
DEFAULT = BUILTIN_POLICIES["default"]
NO_POSTCOPY = BUILTIN_POLICIES["no-postcopy"]
MANUAL = BUILTIN_POLICIES["manual"]


def sample(
    ms: int,
    remaining_mib: float,
    *,
    rate_mib: float = 8,
    iteration: int = 1,
    throttle: int = 0,
    stage: str = "transfer",
) -> Progress:
    return Progress(
        stage,  # type: ignore[arg-type]
        ms,
        128 * MIB,
        0,
        int(remaining_mib * MIB),
        int(rate_mib * MIB),
        0,
        iteration,
        None,
        auto_converge_throttle=throttle,
    )


def run(engine: ConvergenceEngine, samples: list[Progress]) -> list[Decision]:
    return [d for p in samples if (d := engine.decide(p)) is not None]


def dirty_guest(
    rate_mib: float, passes: int = 4, working_set_mib: float = 64, nonzero_mib: float = 64
) -> list[Progress]:
    """A guest that re-dirties its whole working set every pass (as the lab's dirty-1 does):
    each pass starts with it all left to send, and takes working_set / rate seconds; the first
    pass sends the guest's non-zero memory (zero pages cost next to nothing on the wire)."""
    pass_ms = int(working_set_mib / rate_mib * 1000)
    first_ms = int(nonzero_mib / rate_mib * 1000)
    out = [sample(100, 120, rate_mib=rate_mib)]
    out += [sample(first_ms // 2, 64, rate_mib=rate_mib)]
    for k in range(2, passes + 2):
        start = first_ms + (k - 2) * pass_ms
        out.append(sample(start, working_set_mib, rate_mib=rate_mib, iteration=k))
        half = sample(start + pass_ms // 2, working_set_mib / 2, rate_mib=rate_mib, iteration=k)
        out.append(half)
    return out


def test_the_first_decision_sets_the_schedules_first_downtime() -> None:
    engine = ConvergenceEngine(DEFAULT, memory_mib=128, max_duration_s=1800)
    (first,) = run(engine, [sample(100, 120)])
    assert first.action == "set_downtime" and first.downtime_ms == 300  # QEMU's own default
    stepped = MigrationPolicy(max_downtime_ms=500, downtime_steps=5)
    (first,) = run(ConvergenceEngine(stepped, 128, 1800), [sample(100, 120)])
    assert first.downtime_ms == 100


@pytest.mark.parametrize("rate", [8, 32, 64])
def test_default_switches_to_postcopy_at_the_first_pass_that_will_not_converge(rate: int) -> None:
    engine = ConvergenceEngine(DEFAULT, memory_mib=128, max_duration_s=1800)
    decisions = run(engine, dirty_guest(rate))
    assert [d.action for d in decisions] == ["set_downtime", "postcopy"]
    switch = decisions[1]
    assert switch.trigger == "not_converging" and switch.figures["iteration"] == 2
    # raising the downtime could not send 64 MiB within 300 ms at this rate: said, and passed over
    assert switch.skipped and switch.skipped[0].startswith("raise_downtime:")
    assert "already at the policy's maximum of 300 ms" in switch.skipped[0]
    assert engine.finished


def test_a_hot_set_smaller_than_memory_is_found_out_at_the_next_pass() -> None:
    # 512 MiB of data, 64 MiB of it hot: the first pass's estimate (64 MiB over a 64 s pass)
    # looks convergent; the second pass (64 MiB in 8 s, all dirty again) is not.
    engine = ConvergenceEngine(DEFAULT, memory_mib=1024, max_duration_s=1800)
    decisions = run(engine, dirty_guest(8, passes=3, nonzero_mib=512))
    assert [d.action for d in decisions] == ["set_downtime", "postcopy"]
    assert decisions[1].figures["iteration"] == 3


def test_raise_downtime_goes_straight_to_the_step_that_sends_what_is_left() -> None:
    # 2 MiB re-dirtied each pass at 8 MiB/s: 250 ms would do; the schedule is 100/200/300.
    # The first pass's estimate looks convergent (2 MiB over 8 s); the second (2 MiB over
    # 0.25 s) is not.
    stepped = MigrationPolicy(downtime_steps=3)
    engine = ConvergenceEngine(stepped, memory_mib=128, max_duration_s=1800)
    decisions = run(engine, dirty_guest(8, passes=2, working_set_mib=2))
    raised = decisions[1]
    assert raised.figures["iteration"] == 3
    assert raised.action == "raise_downtime" and raised.downtime_ms == 300
    assert not engine.finished  # post-copy stays next, should it still not converge


def test_a_converging_guest_is_left_alone() -> None:
    engine = ConvergenceEngine(DEFAULT, memory_mib=128, max_duration_s=1800)
    samples = [sample(100, 120), sample(8000, 30, iteration=2), sample(12000, 4, iteration=3)]
    assert [d.action for d in run(engine, samples)] == ["set_downtime"]


def test_no_postcopy_throttles_then_suspends_after_the_progress_timeout() -> None:
    engine = ConvergenceEngine(NO_POSTCOPY, memory_mib=128, max_duration_s=1800)
    decisions = run(engine, dirty_guest(8, passes=4))
    assert [d.action for d in decisions] == ["set_downtime", "throttle", "suspend"]
    throttle, suspend = decisions[1], decisions[2]
    assert throttle.trigger == "not_converging"
    assert suspend.trigger == "stalled" and "progress timeout 10s" in suspend.reason
    # the stall was seen mid-pass; the guest is paused only as the next pass starts
    assert "as the pass ended" in suspend.reason
    assert suspend.figures["remaining_mib"] == 64.0
    assert all("postcopy" not in s for d in decisions for s in d.skipped)


def test_throttle_at_its_limit_moves_on_at_the_next_pass() -> None:
    engine = ConvergenceEngine(NO_POSTCOPY, memory_mib=128, max_duration_s=1800)
    samples = [sample(100, 120), sample(8000, 64, iteration=2)]
    samples.append(sample(16000, 64, iteration=3, throttle=99))
    assert [d.action for d in run(engine, samples)] == ["set_downtime", "throttle", "suspend"]


def test_manual_takes_no_action_and_says_so_once() -> None:
    engine = ConvergenceEngine(MANUAL, memory_mib=128, max_duration_s=1800)
    decisions = run(engine, dirty_guest(8, passes=6))
    assert [d.action for d in decisions] == ["set_downtime", "none_left"]
    assert decisions[0].downtime_ms == MANUAL.max_downtime_ms


def test_the_fleets_hard_limit_aborts_whatever_the_policy() -> None:
    engine = ConvergenceEngine(MANUAL, memory_mib=128, max_duration_s=10)
    decisions = run(engine, [sample(100, 120), sample(9_999, 60), sample(10_001, 60)])
    assert decisions[-1].action == "abort" and decisions[-1].trigger == "hard_limit"
    assert engine.decide(sample(11_000, 60)) is None  # once


def test_completion_timeout_scales_with_memory_and_acts_once() -> None:
    policy = MigrationPolicy(completion_timeout_per_gib_s=10, progress_timeout_s=3600)
    engine = ConvergenceEngine(policy, memory_mib=2048, max_duration_s=1800)  # 20 s
    samples = [sample(100, 1000 - i) for i in range(0, 20)]  # first pass, steadily lower
    samples[-1] = sample(20_001, 500)
    decisions = run(engine, samples)
    assert decisions[-1].trigger == "completion_timeout" and decisions[-1].action == "postcopy"
    assert "completion timeout of 20s" in decisions[-1].reason


def test_a_fixed_completion_timeout_wins_over_the_per_gib_one() -> None:
    policy = MigrationPolicy(completion_timeout_s=5, actions=(PolicyAction.SUSPEND,))
    assert policy.completion_timeout_for(64 * 1024) == 5


def test_the_first_pass_makes_progress_while_it_sends() -> None:
    # A long first pass (1 MiB/s) is never a stall: what is left keeps going down.
    policy = MigrationPolicy(progress_timeout_s=5)
    engine = ConvergenceEngine(policy, memory_mib=128, max_duration_s=1800)
    samples = [sample(ms, 128 - ms / 1000, rate_mib=1) for ms in range(100, 60_000, 1000)]
    assert [d.action for d in run(engine, samples)] == ["set_downtime"]


def test_nothing_is_decided_outside_pre_copy() -> None:
    engine = ConvergenceEngine(DEFAULT, memory_mib=128, max_duration_s=1)
    assert engine.decide(sample(5000, 10, stage="postcopy")) is None
    assert engine.decide(sample(5000, 10, stage="completing")) is None


def test_a_jobs_own_completion_timeout_is_a_timer_not_a_judgement() -> None:
    # --completion-timeout 5 --timeout-action suspend (virsh's --timeout): suspend at 5 s,
    # not at the first pass that will not converge.
    timer = MigrationPolicy(
        completion_timeout_s=5, act_on_statistics=False, actions=(PolicyAction.SUSPEND,)
    )
    engine = ConvergenceEngine(timer, memory_mib=128, max_duration_s=1800)
    samples = dirty_guest(64, passes=8)
    decisions = run(engine, samples)
    assert [d.action for d in decisions] == ["set_downtime", "suspend"]
    assert (
        decisions[1].trigger == "completion_timeout" and decisions[1].figures["elapsed_ms"] > 5000
    )


def test_a_step_in_the_first_pass_gives_libvirts_dirty_rate_not_a_guess() -> None:
    """No pass has ended yet: what is left over a pass of 1 ms gave a probe's completion
    timeout steps '52589.8 MiB/s dirtied'."""
    policy = MigrationPolicy(completion_timeout_s=5, actions=(PolicyAction.ABORT,))
    engine = ConvergenceEngine(policy, memory_mib=128, max_duration_s=1800)
    decisions = run(engine, [sample(100, 120), sample(6000, 100)])
    step = decisions[-1]
    assert (step.trigger, step.action) == ("completion_timeout", "abort")
    assert step.event_fields()["dirty_mib_s"] == 0  # libvirt's own figure: none measured
