"""What to do about a running migration: the policy half of the monitor.

Pure functions of the samples and of what was decided before, so they are tested without a
hypervisor, and a restarted worker that re-attaches judges the same way (libvirt's elapsed
time counts from the migration's real start).

The judgement acts on libvirt's statistics, not on a clock (docs/convergence.md):
- At the start of every pass after the first (libvirt's `memory_iteration` moves on), the
  pass's dirty rate is known: what is left to send over how long the previous pass took (or
  libvirt's own dirty rate, if higher). When that reaches `NON_CONVERGENCE_RATIO` of what the
  link carries, pre-copy will not converge and the policy acts at once.
- Progress means a new low of what is left at the start of a pass (or during the first pass,
  when it only goes down); none for `progress_timeout_s` is a stall, and the policy acts.
- The completion timeout (per GiB of guest memory, or the job's own) makes it act too.
Acting takes the policy's next action that can help: raising the allowed downtime only when
a step of the schedule is long enough to send what is left at the current rate; throttling
only with auto-converge on; post-copy only when the policy allows it. Every decision names the
figures it looked at and the actions it passed over, and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from config.policy_model import MAX_THROTTLE_PERCENT, MigrationPolicy, PolicyAction
from worker.progress import Progress

MS_PER_S = 1000
MIB = 1024 * 1024
# Dirtying at this share of the transfer rate or more, a pass leaves about as much to send as
# the one before: pre-copy will not converge (a guest below it converges, if slowly).
NON_CONVERGENCE_RATIO = 0.9
# A "new low" must beat the previous one by this share: remaining data jitters by a few pages.
PROGRESS_MARGIN = 0.02

StepAction = Literal[
    "set_downtime", "raise_downtime", "throttle", "postcopy", "suspend", "abort", "none_left"
]


@dataclass(frozen=True)
class Decision:
    """One `policy.step`: the action, the trigger, why, and the figures it looked at."""

    action: StepAction
    trigger: str  # start | not_converging | stalled | completion_timeout | hard_limit
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # actions passed over, each with why
    downtime_ms: int | None = None  # for set_downtime / raise_downtime

    def event_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "action": self.action,
            "trigger": self.trigger,
            "reason": self.reason,
            "by": "policy",
            **self.figures,
        }
        if self.skipped:
            fields["skipped"] = list(self.skipped)
        if self.downtime_ms is not None:
            fields["downtime_ms"] = self.downtime_ms
        return fields


# The fleet's limit on any migration's duration: the one trigger that outlasts the policy.
HARD_LIMIT = "hard_limit"
TERMINAL_ACTIONS = {PolicyAction.POSTCOPY, PolicyAction.SUSPEND, PolicyAction.ABORT}


@dataclass
class ConvergenceEngine:
    """Judges a pre-copy migration's samples against its effective policy (see module doc)."""

    policy: MigrationPolicy
    memory_mib: int
    max_duration_s: float  # the fleet's hard limit (tunables.migration_timeout)
    next_action: int = 0  # index into policy.actions
    downtime_ms: int | None = None  # what libvirt was last told
    finished: bool = False  # a terminal action was taken, or none is left
    timed_out: bool = False
    hard_limited: bool = False
    iteration: int = 0
    pass_started_ms: int = 0
    previous_pass_ms: int = 0
    best_remaining: int | None = None
    progress_at_ms: int = 0  # when the last new low (or step) happened
    throttling: bool = False  # the throttle step was taken: give it time to bite
    # A suspend decided mid-pass waits for the pass to end (trigger, why): paused now, the
    # guest would stay paused while the pages it dirtied since the pass began are sent too.
    deferred: tuple[str, str] | None = None
    deferred_skipped: tuple[str, ...] = ()

    def initial_downtime_ms(self) -> int:
        """The schedule's first step when the policy may raise it, else its maximum."""
        if PolicyAction.RAISE_DOWNTIME in self.policy.actions:
            return self.policy.downtime_schedule_ms()[0]
        return self.policy.max_downtime_ms

    def start(self, p: Progress) -> Decision | None:
        """The first decision, once libvirt reports the transfer: the initial downtime."""
        if self.downtime_ms is not None:
            return None
        self.downtime_ms = self.initial_downtime_ms()
        return Decision(
            "set_downtime",
            "start",
            "the policy's allowed downtime at the start of the migration",
            _figures(p),
            downtime_ms=self.downtime_ms,
        )

    def decide(self, p: Progress) -> Decision | None:
        """The decision `p` calls for, or None."""
        if p.stage != "transfer":
            return None
        if p.time_elapsed_ms > self.max_duration_s * MS_PER_S and not self.hard_limited:
            self.hard_limited = self.finished = True
            reason = (
                f"migration still not converged after {self.max_duration_s:.0f}s "
                f"({p.data_remaining // MIB} MiB remaining): the fleet's migration_timeout"
            )
            return Decision("abort", HARD_LIMIT, reason, _figures(p))
        if self.finished:
            return None
        first = self.start(p)
        if first is not None:
            self.pass_started_ms = p.time_elapsed_ms
            self.iteration = p.memory_iteration
            self._progress(p, new_pass=False)
            return first
        new_pass = p.memory_iteration > self.iteration
        if new_pass:
            self.previous_pass_ms = max(1, p.time_elapsed_ms - self.pass_started_ms)
            self.pass_started_ms = p.time_elapsed_ms
            self.iteration = p.memory_iteration
        self._progress(p, new_pass)
        if self.deferred is not None:
            return self._act(p, *self.deferred, new_pass=True) if new_pass else None
        trigger = self._trigger(p, new_pass)
        if trigger is None:
            return None
        return self._act(p, *trigger, new_pass=new_pass)

    def _progress(self, p: Progress, new_pass: bool) -> None:
        """Count a new low of what is left: during the first pass (it only goes down), then
        at the start of each pass (within a pass it always goes down)."""
        first_pass = p.memory_iteration <= 1
        if not (first_pass or new_pass):
            return
        if new_pass and p.memory_iteration == 2:
            self.best_remaining = None  # pass starts are compared with pass starts only
        best = self.best_remaining
        if best is None or p.data_remaining < best * (1 - PROGRESS_MARGIN):
            self.best_remaining = p.data_remaining
            self.progress_at_ms = p.time_elapsed_ms

    def dirty_rate(self, p: Progress) -> int:
        """Bytes dirtied per second over the last pass: what is left over how long the pass
        took, or libvirt's own figure if higher."""
        if self.previous_pass_ms <= 0:  # no pass has ended yet: libvirt's figure alone
            return p.dirty_bytes_per_s
        per_pass = p.data_remaining * MS_PER_S // self.previous_pass_ms
        return max(p.dirty_bytes_per_s, per_pass)

    def _trigger(self, p: Progress, new_pass: bool) -> tuple[str, str] | None:
        # After the throttle step, a pass that still dirties too much is QEMU's cue to throttle
        # harder, not ours to move on: only a stall or the throttle at its limit moves on.
        throttle_bites = self.throttling and p.auto_converge_throttle < MAX_THROTTLE_PERCENT
        watching = self.policy.act_on_statistics
        passed = new_pass and p.memory_iteration >= 2 and p.memory_bandwidth > 0
        if watching and passed and not throttle_bites:
            dirty = self.dirty_rate(p)
            if dirty >= NON_CONVERGENCE_RATIO * p.memory_bandwidth:
                return (
                    "not_converging",
                    f"pass {p.memory_iteration - 1} dirtied {_mib(dirty)} MiB/s, the link "
                    f"carries {_mib(p.memory_bandwidth)} MiB/s: pre-copy will not converge",
                )
        stalled_ms = p.time_elapsed_ms - self.progress_at_ms
        if watching and stalled_ms > self.policy.progress_timeout_s * MS_PER_S:
            return (
                "stalled",
                f"no new low of remaining data for {stalled_ms / MS_PER_S:.0f}s "
                f"(progress timeout {self.policy.progress_timeout_s:g}s)",
            )
        timeout_s = self.policy.completion_timeout_for(self.memory_mib)
        if not self.timed_out and p.time_elapsed_ms > timeout_s * MS_PER_S:
            self.timed_out = True
            return ("completion_timeout", f"completion timeout of {timeout_s:g}s reached")
        return None

    def _act(self, p: Progress, trigger: str, why: str, *, new_pass: bool) -> Decision | None:
        """The policy's next action that can help, passing over (and naming) those that
        cannot; the stall clock restarts with every step. A suspend waits for the pass's end."""
        self.progress_at_ms = p.time_elapsed_ms
        skipped: list[str] = []
        actions = self.policy.actions
        while self.next_action < len(actions):
            action = actions[self.next_action]
            useless = self._useless(action, p)
            if useless is not None:
                skipped.append(f"{action.value}: {useless}")
                self.next_action += 1
                continue
            # (a job's own timer is kept to the second: suspended when it rings)
            if action is PolicyAction.SUSPEND and not new_pass and self.policy.act_on_statistics:
                self.deferred, self.deferred_skipped = (trigger, why), tuple(skipped)
                return None
            if self.deferred is not None:
                why = f"{why} (suspended as the pass ended: fewest pages left to send paused)"
                skipped[:0] = self.deferred_skipped
                self.deferred, self.deferred_skipped = None, ()
            decision = self._step(action, p, trigger, why, tuple(skipped))
            self.throttling = action is PolicyAction.THROTTLE
            if action in TERMINAL_ACTIONS:
                self.finished = True
            if action is not PolicyAction.RAISE_DOWNTIME or self.downtime_ms == max(
                self.policy.downtime_schedule_ms()
            ):
                self.next_action += 1
            return decision
        self.finished = True
        left = "the policy has no action left; the migration runs on until the fleet's limit"
        return Decision("none_left", trigger, f"{why}; {left}", _figures(p), tuple(skipped))

    def _needed_ms(self, p: Progress) -> int | None:
        if p.memory_bandwidth <= 0:
            return None
        return p.data_remaining * MS_PER_S // p.memory_bandwidth

    def _useless(self, action: PolicyAction, p: Progress) -> str | None:
        """Why `action` cannot help now, or None if it can."""
        if action is PolicyAction.RAISE_DOWNTIME:
            needed = self._needed_ms(p)
            steps = [s for s in self.policy.downtime_schedule_ms() if s > (self.downtime_ms or 0)]
            if not steps:
                return f"already at the policy's maximum of {self.policy.max_downtime_ms} ms"
            if needed is None:
                return "no transfer rate reported yet"
            if needed > steps[-1]:
                return (
                    f"{_mib(p.data_remaining)} MiB left needs {needed} ms at "
                    f"{_mib(p.memory_bandwidth)} MiB/s, over the policy's maximum of "
                    f"{self.policy.max_downtime_ms} ms"
                )
            return None
        if action is PolicyAction.THROTTLE:
            if not self.policy.auto_converge:
                return "auto-converge is off in this policy"
            if p.auto_converge_throttle >= MAX_THROTTLE_PERCENT:
                return f"the guest is already throttled to {p.auto_converge_throttle}%"
            return None
        if action is PolicyAction.POSTCOPY and not self.policy.allow_postcopy:
            return "post-copy is not allowed for this migration"
        return None

    def _step(
        self, action: PolicyAction, p: Progress, trigger: str, why: str, skipped: tuple[str, ...]
    ) -> Decision:
        figures = _figures(p) | {"dirty_mib_s": _mib(self.dirty_rate(p))}
        if action is PolicyAction.RAISE_DOWNTIME:
            needed = self._needed_ms(p) or 0
            current = self.downtime_ms or 0
            steps = [s for s in self.policy.downtime_schedule_ms() if s > current]
            fits = [s for s in steps if s >= needed]
            self.downtime_ms = fits[0] if fits else steps[-1]
            reason = f"{why}; {needed} ms would send what is left: allow {self.downtime_ms} ms"
            return Decision(
                "raise_downtime", trigger, reason, figures, skipped, downtime_ms=self.downtime_ms
            )
        kind, said = _SAID[action]
        return Decision(kind, trigger, f"{why}; {said}", figures, skipped)


_SAID: dict[PolicyAction, tuple[StepAction, str]] = {
    PolicyAction.THROTTLE: ("throttle", "let auto-converge slow the guest's vCPUs"),
    PolicyAction.POSTCOPY: (
        "postcopy",
        "switch to post-copy: the guest runs on the destination now",
    ),
    PolicyAction.SUSPEND: ("suspend", "pause the guest until the rest is copied"),
    PolicyAction.ABORT: ("abort", "give up: the guest stays on the source"),
}


def _mib(n: int) -> float:
    return round(n / MIB, 1)


def _figures(p: Progress) -> dict[str, Any]:
    return {
        "remaining_mib": _mib(p.data_remaining),
        "transfer_mib_s": _mib(p.memory_bandwidth),
        "libvirt_dirty_mib_s": _mib(p.dirty_bytes_per_s),
        "iteration": p.memory_iteration,
        "throttle": p.auto_converge_throttle,
        "elapsed_ms": p.time_elapsed_ms,
    }
