"""One run of one phase, as the frame around it (worker/phase_frame.py) and the judgement of
how it stopped (worker/phase_failure.py) both see it, and the record of its end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jobs.model import Job, PhaseRecord
from jobs.phases import Phase
from jobs.states import JobState
from worker.ledger import PhaseMark
from worker.runtime import Runtime

PhaseFn = Callable[[Runtime, Job], JobState | None]


@dataclass(frozen=True)
class PhaseRun:
    """One run of one phase: `recovering` re-runs a phase this host had started before it
    crashed (no new claim); `attempt` counts Celery's retries of it."""

    rt: Runtime
    phase: Phase
    fn: PhaseFn
    recovering: bool = False
    attempt: int = 0


def phase_ended(
    run: PhaseRun, job: Job, *, error: str | None = None, started: PhaseRecord | None = None
) -> None:
    """The phase's end, in the job record and in this host's ledger (recovery reads the
    ledger, not the record, to know that it is over here)."""
    run.rt.store.phase_ended(job.id, run.phase.value, error=error, started=started)
    run.rt.ledger.mark(job.id, run.phase.value, PhaseMark.ENDED)
