"""One run of one phase, as the frame around it (worker/phase_frame.py) and the judgement of
how it stopped (worker/phase_failure.py) both see it, and the record of its end."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from config.events import get_logger
from jobs.model import Job, PhaseRecord
from jobs.phases import Phase
from jobs.states import JobState
from worker.ledger import PhaseMark
from worker.runtime import Runtime

log = get_logger()

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
    _mark_ended(run, job)


def phase_ended_entering(
    run: PhaseRun, job: Job, then: JobState, started: PhaseRecord | None
) -> tuple[bool, JobState | None]:
    """The phase's end and the state it returns, in one write (jobs/records.py says why),
    then in this host's ledger; the transition's (moved, previous state)."""
    outcome = run.rt.store.end_phase_entering(
        job.id, run.phase.value, started, then, host=run.rt.host
    )
    _mark_ended(run, job)
    return outcome


def _mark_ended(run: PhaseRun, job: Job) -> None:
    """The end in this host's ledger. Refused (locked past its wait, its disk full), it is
    said, and the job goes on: its end and its verdict (the state entered, a failure) are in
    Redis already; stopping here would leave the phase ended and the verdict never given."""
    try:
        run.rt.ledger.mark(job.id, run.phase.value, PhaseMark.ENDED)
    except sqlite3.Error as exc:
        log.warning("phase.end_unmarked", reason=f"{run.rt.host}'s ledger: {exc}")
