"""What to do about a migration that is running: the policy half of the monitor.

Decisions are pure functions of the samples so they can be tested without a hypervisor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from worker.monitor_types import ProgressLike

MS_PER_S = 1000


@dataclass(frozen=True)
class Action:
    kind: Literal["continue", "abort", "cancel"]  # cancel: the operator asked to abort
    reason: str = ""


CONTINUE = Action("continue")


@dataclass
class ConvergencePolicy:
    """Abort a migration that has run longer than the job may take."""

    max_duration_s: float

    def decide(self, progress: ProgressLike) -> Action:
        if progress.time_elapsed_ms > self.max_duration_s * MS_PER_S:
            return Action(
                "abort",
                f"migration still not converged after {self.max_duration_s:.0f}s "
                f"({progress.data_remaining // (1024 * 1024)} MiB remaining)",
            )
        return CONTINUE
