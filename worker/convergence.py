"""What to do about a migration that is running: the policy half of the monitor.

Decisions are pure functions of the samples (and of what the policy already decided) so they
can be tested without a hypervisor. The same policy judges a migration a restarted worker
re-attaches to, since libvirt's elapsed time counts from the migration's real start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jobs.spec import ControlFlow, MigrationSpec, TimeoutAction
from worker.monitor_types import ProgressLike

MS_PER_S = 1000
MIB = 1024 * 1024

ActionKind = Literal["continue", "abort", "cancel", "suspend", "postcopy", "handover"]


@dataclass(frozen=True)
class Action:
    kind: ActionKind  # cancel: the operator asked to abort
    reason: str = ""


CONTINUE = Action("continue")


def drain_action(spec: MigrationSpec, drained_s: float, drain_timeout_s: float) -> Action:
    """What a worker in warm shutdown does about a migration it drives, `drained_s` into the
    shutdown (0 while not draining): let it run until the drain timeout; then hand a
    peer-to-peer one over (libvirtd drives it without its client; the next worker of the
    host re-attaches to it), and abort any other, which cannot outlive its client."""
    if drained_s <= 0 or drained_s < drain_timeout_s:
        return CONTINUE
    waited = f"the worker is shutting down and its drain timeout ({drain_timeout_s:g}s) passed"
    if spec.control is ControlFlow.P2P:
        return Action("handover", f"{waited}; libvirtd carries the migration on")
    return Action("abort", f"{waited}; a {spec.control.value} migration cannot outlive it")


@dataclass
class ConvergencePolicy:
    """The job's completion timeout (once), then the fleet's hard limit on a migration."""

    max_duration_s: float
    timeout_s: float | None = None
    on_timeout: TimeoutAction | None = None
    timed_out: bool = False

    @classmethod
    def for_job(cls, spec: MigrationSpec, max_duration_s: float) -> ConvergencePolicy:
        return cls(max_duration_s, spec.completion_timeout_s, spec.on_timeout)

    def decide(self, progress: ProgressLike) -> Action:
        elapsed_ms = progress.time_elapsed_ms
        if elapsed_ms > self.max_duration_s * MS_PER_S:
            return Action(
                "abort",
                f"migration still not converged after {self.max_duration_s:.0f}s "
                f"({progress.data_remaining // MIB} MiB remaining)",
            )
        if (
            self.timeout_s is not None
            and self.on_timeout is not None
            and not self.timed_out
            and elapsed_ms > self.timeout_s * MS_PER_S
        ):
            self.timed_out = True
            return Action(
                self.on_timeout.value,
                f"completion timeout of {self.timeout_s:.0f}s reached with "
                f"{progress.data_remaining // MIB} MiB remaining",
            )
        return CONTINUE
