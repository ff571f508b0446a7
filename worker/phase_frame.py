"""The frame around every phase, as explicit steps in order (as dramatiq keeps such concerns
in middleware), so that each phase reads as the handful of libvirt facts it checks and the
one thing it does:

    load      the message names a live job, and this host owns the phase
    admit     the job is live (and no operator's cancel of it reached this host), holds its
              slot in every gate, its request is signed, and this worker takes work (a
              draining one sends the phase back to the queue)
    claim     the phase runs once per job: a claim in Redis and in this host's ledger
    mark      run by this process: recovery on any worker of this host leaves it alone
    record    its start and end in the job record (and the fault suite's delay)
    failure   what stopped it, judged in order (worker/phase_failure.py): handed over,
              skipped, libvirtd unreachable (retried; out of tries, failed before the
              migration and left to recovery from perform on), failed, Redis gone, unexpected
    job end   the state the phase returned is entered last (its event and the phase's end
              in one round trip); an end tells the listeners

A step that drops the message raises `Dropped` (worker/phase_errors.py), never Celery's
`Ignore`; worker/tasks.py translates at the edge.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from config.celery import app
from config.events import batched, get_logger
from jobs.model import Job, PhaseRecord
from jobs.phases import Phase, owner_of
from jobs.states import TERMINAL, JobState
from jobs.store import JobNotFound
from jobs.workflow import migration_chain
from worker.cancel_notice import cancelled_here
from worker.contradicted_end import reopened
from worker.job_end import entered, holds_slots, job_context, job_ended, verified
from worker.ledger import PhaseMark
from worker.phase_errors import Dropped
from worker.phase_failure import failure_step, ledger_unwritable
from worker.phase_run import PhaseFn, PhaseRun, phase_ended, phase_ended_entering
from worker.runtime import Runtime

log = get_logger()
MS_PER_S = 1000


def execute_phase(
    rt: Runtime,
    job_id: str,
    phase: Phase,
    fn: PhaseFn,
    *,
    recovering: bool = False,
    attempt: int = 0,
) -> None:
    """Run one phase inside its frame, its steps in the order the module docstring gives."""
    run = PhaseRun(rt, phase, fn, recovering, attempt)
    job = _load(run, job_id)
    with structlog.contextvars.bound_contextvars(**job_context(job, phase.value)):
        job = _admit(run, job)
        _claim(run, job)
        with _marked(run, job):
            _run(run, job)


def run_in_frame(
    rt: Runtime, job: Job, phase: Phase, fn: PhaseFn, recovering: bool, attempt: int
) -> None:
    """The frame's last steps (record, failure, job end) around `fn`, for a claimed phase."""
    _run(PhaseRun(rt, phase, fn, recovering, attempt), job)


def _load(run: PhaseRun, job_id: str) -> Job:
    rt, phase = run.rt, run.phase
    try:
        job = rt.store.get(job_id)
    except JobNotFound:
        log.warning("message.rejected", reason=f"no job {job_id}", phase=phase.value)
        raise Dropped(f"no job {job_id}") from None
    expected = owner_of(job.spec, phase)
    if expected != rt.host:
        reason = f"{phase.value} belongs to {expected}, not {rt.host}"
        log.warning("message.rejected", job_id=job_id, reason=reason)
        raise Dropped(reason)
    return job


def _admit(run: PhaseRun, job: Job) -> Job:
    """The job, if this phase may run for it (taken back up if libvirt contradicts its end:
    worker/contradicted_end.py); else Dropped."""
    rt = run.rt
    cancelled_by = cancelled_here(rt, job)  # an operator's cancel, as this host keeps it
    if cancelled_by is not None:
        log.info("phase.skipped", reason=f"job cancelled by {cancelled_by}")
        raise Dropped(JobState.CANCELLED.value)
    if job.terminal:
        taken_up = reopened(rt, job, run.phase)
        if taken_up is None:
            log.info("phase.skipped", reason=f"job already {job.state.value}")
            raise Dropped(job.state.value)
        job = taken_up
    if job.admitted is None:
        # Only admission starts a job (jobs/admission.py): a message for a job that holds
        # no concurrency slot did not come from drover, and must not take the phase.
        log.warning("message.rejected", reason="job was never admitted under the limits")
        raise Dropped("not admitted")
    if not holds_slots(rt, job):  # nor does `admitted` without the slots (written by hand)
        raise Dropped("no slot")
    if not verified(rt, job):
        raise Dropped("not signed")
    if rt.draining and not run.recovering:
        # Taken from the queue before the warm shutdown stopped the consumer: this
        # worker starts nothing new, so the phase goes back for the host's next worker.
        log.warning("phase.deferred", reason=f"{rt.host}'s worker is shutting down")
        migration_chain(app, job.id, job.spec, start=run.phase).apply_async()
        raise Dropped("draining")
    return job


def _claim(run: PhaseRun, job: Job) -> None:
    rt, phase = run.rt, run.phase.value
    if run.recovering:
        return
    if not rt.store.claim_phase(job.id, phase, rt.host):
        log.warning("phase.duplicate", reason="this phase already ran for this job")
        raise Dropped("claimed")
    try:
        ours = rt.ledger.claim(job.id, phase)
    except sqlite3.Error as exc:  # locked, its disk full: nothing ran yet
        ledger_unwritable(run, job, exc)
    if not ours:
        # Redis said the phase was free, but this host has run it: a claim was removed
        # behind drover's back (or the message replayed); the host's own record wins.
        log.warning("phase.duplicate", reason="this host already ran this phase of the job")
        raise Dropped("claimed here")


@contextmanager
def _marked(run: PhaseRun, job: Job) -> Iterator[None]:
    """Mark the phase as run by this worker, in this process and in Redis (unless a recovery
    in this process already marked it), for as long as it runs; this worker's heartbeat
    keeps the mark alive."""
    rt, phase = run.rt, run.phase.value
    if rt.marked(job.id, phase):
        yield
        return
    holder = rt.begin(job.id, phase)
    if holder is not None:
        log.warning("phase.duplicate", reason=f"worker {holder} on {rt.host} runs this phase")
        raise Dropped("running elsewhere")
    try:
        yield
    finally:
        rt.end(job.id, phase)


def _run(run: PhaseRun, job: Job) -> None:
    started, record = _record_start(run, job)
    try:
        then = run.fn(run.rt, job)
    except Exception as exc:
        failure_step(exc)(run, job, exc)
    with batched():  # `phase.finished` and the state the phase returned: one round trip
        _record_end(run, job, started, record, then)
    if then in TERMINAL:
        job_ended(run.rt, job)  # the listeners' own events are not held back by the batch


def _record_start(run: PhaseRun, job: Job) -> tuple[float, PhaseRecord | None]:
    """Record the start; the monotonic time it started (the fault delay counts in it), and
    the phase record written (None: a recovery's, already there)."""
    started = time.monotonic()
    rt, phase = run.rt, run.phase.value
    record = None
    if not run.recovering or phase not in job.phases:
        record = rt.store.phase_started(job.id, phase, rt.host)
    rt.ledger.mark(job.id, phase, PhaseMark.STARTED)
    log.info("phase.recovering" if run.recovering else "phase.started")
    delay = rt.settings.faults.phase_delays.get(phase)
    if delay and not run.recovering:
        log.warning("fault.delay", seconds=delay)  # the fault suite's window into this phase
        time.sleep(delay)
    return started, record


def _record_end(
    run: PhaseRun, job: Job, started: float, record: PhaseRecord | None, then: JobState | None
) -> None:
    """The phase's end, and the state it returns entered in the same write: a worker killed
    or Redis gone between the two would leave the phase ended and its state never entered.
    Entering the state last keeps the job's terminal event last in its stream."""
    if then is None:
        phase_ended(run, job, started=record)
    else:
        moved, previous = phase_ended_entering(run, job, then, record)
    log.info("phase.finished", duration_ms=round((time.monotonic() - started) * MS_PER_S, 1))
    if then is not None:
        entered(job, then, moved, previous)
