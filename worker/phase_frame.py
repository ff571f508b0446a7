"""The frame around every phase, as explicit steps in order (as dramatiq keeps such concerns
in middleware), so that each phase reads as the handful of libvirt facts it checks and the
one thing it does:

    load      the message names a live job, and this host owns the phase
    admit     the job is live, holds its slot in every gate, its request is signed, and
              this worker takes work (a draining one sends the phase back to the queue)
    claim     the phase runs once per job: a claim in Redis and in this host's ledger
    mark      run by this process: recovery on any worker of this host leaves it alone
    record    its start and end in the job record (and the fault suite's delay)
    failure   what stopped it, judged in order: handed over, skipped, libvirtd unreachable
              (the retry predicate: retried, or failed), failed, Redis gone, unexpected
    job end   the state the phase returned is entered last; an end tells the listeners

A step that drops the message raises `Dropped` (worker/phase_errors.py), never Celery's
`Ignore`; worker/tasks.py translates at the edge.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import redis
import structlog

from config.celery import app
from config.events import get_logger
from jobs.model import Job, PhaseRecord
from jobs.phases import RULES, Phase, owner_of
from jobs.states import TERMINAL, JobState
from jobs.store import JobNotFound
from jobs.workflow import migration_chain
from worker.job_end import (
    advance,
    fail_job,
    holds_slots,
    job_context,
    job_ended,
    rollback_destination_later,
    touched_destination,
    verified,
)
from worker.ledger import PhaseMark
from worker.libvirt_host import LibvirtError, LibvirtUnavailable, is_connection_error
from worker.phase_errors import Dropped, HandedOver, NeverLeft, PhaseFailed, RetryPhase
from worker.runtime import Runtime

log = get_logger()
MS_PER_S = 1000

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
        _admit(run, job)
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


def _admit(run: PhaseRun, job: Job) -> None:
    rt = run.rt
    if job.terminal:
        log.info("phase.skipped", reason=f"job already {job.state.value}")
        raise Dropped(job.state.value)
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


def _claim(run: PhaseRun, job: Job) -> None:
    rt, phase = run.rt, run.phase.value
    if run.recovering:
        return
    if not rt.store.claim_phase(job.id, phase, rt.host):
        log.warning("phase.duplicate", reason="this phase already ran for this job")
        raise Dropped("claimed")
    if not rt.ledger.claim(job.id, phase):
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
        _failure_step(exc)(run, job, exc)
    _record_end(run, job, started, record)
    _end_job(run, job, then)


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


def _record_end(run: PhaseRun, job: Job, started: float, record: PhaseRecord | None) -> None:
    _phase_ended(run, job, started=record)
    log.info("phase.finished", duration_ms=round((time.monotonic() - started) * MS_PER_S, 1))


def _phase_ended(
    run: PhaseRun, job: Job, *, error: str | None = None, started: PhaseRecord | None = None
) -> None:
    """The phase's end, in the job record and in this host's ledger (recovery reads the
    ledger, not the record, to know that it is over here)."""
    run.rt.store.phase_ended(job.id, run.phase.value, error=error, started=started)
    run.rt.ledger.mark(job.id, run.phase.value, PhaseMark.ENDED)


def _end_job(run: PhaseRun, job: Job, then: JobState | None) -> None:
    """Entering the phase's state last keeps the job's terminal event last in its stream."""
    if then is not None:
        advance(run.rt, job, then)
        if then in TERMINAL:
            job_ended(run.rt, job)


FailureStep = Callable[[PhaseRun, Job, Exception], NoReturn]


def _failure_step(exc: Exception) -> FailureStep:
    """What stopped the phase, judged in this order (the first that matches handles it)."""
    if isinstance(exc, HandedOver):
        return _handed_over
    if isinstance(exc, Dropped):
        return _skipped
    if isinstance(exc, LibvirtUnavailable) or (
        isinstance(exc, LibvirtError) and is_connection_error(exc)
    ):
        return _libvirt_gone
    if isinstance(exc, PhaseFailed):
        return _failed
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return _redis_gone
    return _unexpected


def _handed_over(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    assert isinstance(exc, HandedOver)
    log.warning("phase.handed_over", reason=exc.reason)
    raise exc


def _skipped(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    """The job ended under the phase: free anything the phase took after that end."""
    rt = run.rt
    _phase_ended(run, job, error="skipped")
    if rt.store.state(job.id) in (JobState.CANCELLED, JobState.FAILED):
        rt.store.release_holds(job.id)
        if touched_destination(run.phase):
            rollback_destination_later(job)
    raise exc


def _libvirt_gone(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    """The retry predicate: a phase that changes nothing before it reaches libvirtd is tried
    again (tunables.phase_retries); anything else fails the job."""
    rt, phase = run.rt, run.phase
    if isinstance(exc, LibvirtError):
        rt.libvirt.reset()
    retries = rt.settings.tunables.phase_retries.get(phase.value, 0)
    allowed = retries if RULES[phase].retryable else 0
    if run.attempt < allowed and not run.recovering:
        rt.store.phase_ended(job.id, phase.value, error=f"retrying: {exc}")
        rt.store.unclaim_phase(job.id, phase.value)
        rt.ledger.unclaim(job.id, phase.value)
        log.warning("phase.retrying", reason=str(exc), attempt=run.attempt + 1, of=allowed)
        raise RetryPhase(str(exc)) from exc
    reason = f"{phase.value} on {rt.host}: {exc}"
    _phase_ended(run, job, error=reason)
    log.error("phase.failed", reason=reason)
    fail_job(rt, job, phase, reason)
    raise PhaseFailed(reason) from exc


def _failed(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    assert isinstance(exc, PhaseFailed)
    _phase_ended(run, job, error=exc.reason)
    log.error("phase.failed", reason=exc.reason)
    fail_job(run.rt, job, run.phase, exc.reason, exc.final, never_left=isinstance(exc, NeverLeft))
    raise exc


def _redis_gone(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    """Redis stayed away longer than tunables.redis_retry_for. Nothing is known to have
    failed (a migration may well have completed): the phase stops without a verdict, and
    recovery takes it up from libvirt's state once Redis is back."""
    log.error("phase.interrupted", reason=f"Redis unreachable: {exc}")
    raise exc


def _unexpected(run: PhaseRun, job: Job, exc: Exception) -> NoReturn:
    rt, phase = run.rt, run.phase
    reason = f"{phase.value} on {rt.host} failed unexpectedly: {exc}"
    _phase_ended(run, job, error=reason)
    log.exception("phase.failed", reason=reason)
    fail_job(rt, job, phase, reason)
    raise PhaseFailed(reason) from exc
