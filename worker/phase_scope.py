"""The frame around every phase: checks, context, bookkeeping, and failure handling.

Cross-cutting concerns live here (as dramatiq keeps them in middleware) so that each phase in
worker/phases.py reads as the handful of libvirt facts it checks and the one thing it does:
the message must match a live job and this host; a phase runs once per job however often its
message arrives (a claim in Redis); failures end the job with a reason and clean up behind it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import libvirt
import redis
import structlog
from celery.exceptions import Ignore

from config.celery import app, host_queue
from config.events import get_logger
from jobs.model import Job
from jobs.phases import PHASE_ORDER, PHASE_SIDE, ROLLBACK_DESTINATION_TASK, Phase, Side
from jobs.request_signing import SECURITY_REASON, RequestRefused, check_job, verifier_for
from jobs.states import TERMINAL, JobState
from jobs.store import JobNotFound, domain_lock_key
from jobs.workflow import migration_chain
from worker.admission_pass import admit_waiting
from worker.libvirt_host import LibvirtUnavailable, is_connection_error
from worker.runtime import Runtime

log = get_logger()
MS_PER_S = 1000


class PhaseFailed(Exception):
    """A phase cannot go on; `reason` is one line an operator can act on."""

    final = JobState.FAILED

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryPhase(Exception):
    """The phase could not reach its libvirtd and may be tried again (tunables.phase_retries)."""


class HandedOver(Exception):
    """The phase goes on without this process (a peer-to-peer migration libvirtd carries on
    through this worker's warm shutdown): it stays started, for the next worker to recover."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PhaseCancelled(PhaseFailed):
    """The operator aborted the job; the guest stays where it was."""

    final = JobState.CANCELLED


PhaseFn = Callable[[Runtime, Job], JobState | None]


def owner(job: Job, phase: Phase) -> str:
    return job.spec.src if PHASE_SIDE[phase] is Side.SOURCE else job.spec.dst


def job_context(job: Job, phase: str | None) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "domain": job.spec.domain,
        "src": job.spec.src,
        "dst": job.spec.dst,
        "phase": phase,
    }


def advance(rt: Runtime, job: Job, target: JobState) -> None:
    """Move the job on, or stop this phase quietly if someone else already ended the job."""
    moved, previous = rt.store.transition(job.id, target, host=rt.host)
    if moved:
        log.info("job.state", state=target.value, previous=previous.value if previous else None)
    elif previous is not target:  # ended meanwhile (an abort, a failure elsewhere)
        log.info("phase.skipped", reason=f"job is {previous}, not ready for {target}")
        raise Ignore()


def hold_domain(rt: Runtime, job: Job, uuid: str) -> None:
    """One active job per domain (by UUID), for as long as this job lives."""
    holder = rt.store.take_lease(domain_lock_key("uuid", uuid), job.id)
    if holder is not None:
        raise PhaseFailed(f"{job.spec.domain} ({uuid}) already has an active job {holder}")


def rollback_destination_later(job: Job) -> None:
    app.send_task(ROLLBACK_DESTINATION_TASK, args=(job.id,), queue=host_queue(job.spec.dst))


def moved_already(job: Job, phase: Phase) -> bool:
    """Whether the guest is already where the job was to put it: `phase` comes after finish,
    which verified it on the destination through libvirt (and ended without an error)."""
    record = job.phases.get(Phase.FINISH.value)
    return (
        PHASE_ORDER.index(phase) > PHASE_ORDER.index(Phase.FINISH)
        and record is not None
        and record.ended is not None
        and record.error is None
    )


def succeed_with_leftovers(rt: Runtime, job: Job, leftovers: str) -> None:
    """Report what is left on the source of a job whose guest already runs on its destination:
    in the result and a `confirm.leftovers` event. The job itself succeeded; nothing is rolled
    back (that would act on the host where the guest now runs)."""
    rt.store.update(job.id, result={"leftovers": leftovers})
    log.warning(
        "confirm.leftovers",
        reason=leftovers,
        running_on=job.spec.dst,
        note=f"the guest runs on {job.spec.dst} (finish verified it); the source needs a look",
    )


def fail_job(
    rt: Runtime, job: Job, phase: Phase, reason: str, final: JobState = JobState.FAILED
) -> None:
    """Record the end once, free what the job held, and ask the destination to clean up.

    After a verified finish the move is done whatever failed since: the job succeeds, with
    the failure as leftovers on the source (`succeed_with_leftovers`), and no rollback.
    """
    if final is JobState.FAILED and moved_already(rt.store.get(job.id), phase):
        succeed_with_leftovers(rt, job, reason)
        moved, previous = rt.store.transition(job.id, JobState.SUCCEEDED, host=rt.host)
        if moved:
            was = previous.value if previous else None
            log.info("job.state", state=JobState.SUCCEEDED.value, previous=was)
            job_ended(rt, job)
        return
    moved, _ = rt.store.transition(job.id, final, host=rt.host, reason=reason)
    if not moved:
        return
    log.error("job.state", state=final.value, reason=reason)
    if PHASE_ORDER.index(phase) >= PHASE_ORDER.index(Phase.DESTINATION_PREPARE):
        rollback_destination_later(job)
    job_ended(rt, job)


JobEnded = Callable[[Runtime, Job], object]
# What happens as soon as a job this worker ran has ended, rather than on the next tick:
# its slots are free, so a waiting job may start; its evacuation may be done.
_job_end_listeners: list[JobEnded] = [lambda rt, _job: admit_waiting(rt)]


def on_job_end(listener: JobEnded) -> JobEnded:
    """Register `listener(rt, job)` to run when a job ends in this worker (a decorator)."""
    _job_end_listeners.append(listener)
    return listener


def job_ended(rt: Runtime, job: Job) -> None:
    for listener in _job_end_listeners:
        try:
            listener(rt, job)
        except Exception as exc:  # the keeper's ticks catch up with whatever failed here
            log.warning("job.end_listener_failed", error=str(exc))


def verified(rt: Runtime, job: Job) -> bool:
    """Whether a trusted key signed this job's request as the record shows it.

    A job that fails the check ends `failed` with a `security.rejected` event, and nothing
    else happens: no phase, no rollback (the record is not to be believed about what exists).
    Call it with the job's context bound, so that the event reaches the job's stream.
    """
    try:
        check_job(verifier_for(rt.settings.security), job)
    except RequestRefused as exc:
        reason = f"{SECURITY_REASON}: {exc}"
        log.error("security.rejected", reason=reason)
        moved, _ = rt.store.transition(job.id, JobState.FAILED, host=rt.host, reason=reason)
        if moved:
            log.error("job.state", state=JobState.FAILED.value, reason=reason)
            job_ended(rt, job)
        return False
    return True


def _unexpected(rt: Runtime, job: Job, phase: Phase, exc: Exception) -> NoReturn:
    reason = f"{phase.value} on {rt.host} failed unexpectedly: {exc}"
    rt.store.phase_ended(job.id, phase.value, error=reason)
    log.exception("phase.failed", reason=reason)
    fail_job(rt, job, phase, reason)
    raise PhaseFailed(reason) from exc


@contextmanager
def _running(rt: Runtime, job_id: str, phase: Phase) -> Iterator[None]:
    """Mark the phase as run by this worker, in this process and in Redis (unless a recovery
    in this process already marked it): recovery on any worker of this host leaves it alone
    while this worker's heartbeat keeps the mark alive."""
    with rt.lock:
        marked = (job_id, phase.value) in rt.running
    if marked:
        yield
        return
    holder = rt.begin(job_id, phase.value)
    if holder is not None:
        log.warning("phase.duplicate", reason=f"worker {holder} on {rt.host} runs this phase")
        raise Ignore()
    try:
        yield
    finally:
        rt.end(job_id, phase.value)


def execute_phase(
    rt: Runtime,
    job_id: str,
    phase: Phase,
    fn: PhaseFn,
    *,
    recovering: bool = False,
    attempt: int = 0,
) -> None:
    """Run one phase inside its frame; the state `fn` returns is entered once it is done.

    Entering that state last keeps the job's terminal event the last one in its stream.
    `recovering` re-runs a phase this host had started before it crashed (no new claim).
    """
    try:
        job = rt.store.get(job_id)
    except JobNotFound:
        log.warning("message.rejected", reason=f"no job {job_id}", phase=phase.value)
        raise Ignore() from None
    expected = owner(job, phase)
    if expected != rt.host:
        log.warning(
            "message.rejected",
            job_id=job_id,
            reason=f"{phase.value} belongs to {expected}, not {rt.host}",
        )
        raise Ignore()
    with structlog.contextvars.bound_contextvars(**job_context(job, phase.value)):
        if job.terminal:
            log.info("phase.skipped", reason=f"job already {job.state.value}")
            raise Ignore()
        if job.admitted is None:
            # Only admission starts a job (jobs/admission.py): a message for a job that holds
            # no concurrency slot did not come from drover, and must not take the phase.
            log.warning("message.rejected", reason="job was never admitted under the limits")
            raise Ignore()
        if not verified(rt, job):
            raise Ignore()
        if rt.draining and not recovering:
            # Taken from the queue before the warm shutdown stopped the consumer: this
            # worker starts nothing new, so the phase goes back for the host's next worker.
            log.warning("phase.deferred", reason=f"{rt.host}'s worker is shutting down")
            migration_chain(app, job.id, job.spec, start=phase).apply_async()
            raise Ignore()
        if not recovering and not rt.store.claim_phase(job.id, phase.value, rt.host):
            log.warning("phase.duplicate", reason="this phase already ran for this job")
            raise Ignore()
        if not recovering and not rt.ledger.claim(job.id, phase.value):
            # Redis said the phase was free, but this host has run it: a claim was removed
            # behind drover's back (or the message replayed); the host's own record wins.
            log.warning("phase.duplicate", reason="this host already ran this phase of the job")
            raise Ignore()
        with _running(rt, job.id, phase):
            _run_in_frame(rt, job, phase, fn, recovering, attempt)


def _run_in_frame(
    rt: Runtime, job: Job, phase: Phase, fn: PhaseFn, recovering: bool, attempt: int
) -> None:
    started = time.monotonic()
    if not recovering or phase.value not in job.phases:
        rt.store.phase_started(job.id, phase.value, rt.host)
    log.info("phase.recovering" if recovering else "phase.started")
    delay = rt.settings.faults.phase_delays.get(phase.value)
    if delay and not recovering:
        log.warning("fault.delay", seconds=delay)  # the fault suite's window into this phase
        time.sleep(delay)
    try:
        then = fn(rt, job)
    except HandedOver as exc:
        log.warning("phase.handed_over", reason=exc.reason)
        raise Ignore() from None
    except Ignore:
        rt.store.phase_ended(job.id, phase.value, error="skipped")
        if rt.store.state(job.id).value in ("cancelled", "failed"):
            rt.store.release_holds(job.id)  # anything this phase took after the job ended
            if PHASE_ORDER.index(phase) >= PHASE_ORDER.index(Phase.DESTINATION_PREPARE):
                rollback_destination_later(job)
        raise
    except (LibvirtUnavailable, libvirt.libvirtError) as exc:
        if isinstance(exc, libvirt.libvirtError):
            if not is_connection_error(exc):
                _unexpected(rt, job, phase, exc)
            rt.libvirt.reset()
        allowed = rt.settings.tunables.phase_retries.get(phase.value, 0)
        if attempt < allowed and not recovering:
            rt.store.phase_ended(job.id, phase.value, error=f"retrying: {exc}")
            rt.store.unclaim_phase(job.id, phase.value)
            rt.ledger.unclaim(job.id, phase.value)
            log.warning("phase.retrying", reason=str(exc), attempt=attempt + 1, of=allowed)
            raise RetryPhase(str(exc)) from exc
        reason = f"{phase.value} on {rt.host}: {exc}"
        rt.store.phase_ended(job.id, phase.value, error=reason)
        log.error("phase.failed", reason=reason)
        fail_job(rt, job, phase, reason)
        raise PhaseFailed(reason) from exc
    except PhaseFailed as exc:
        rt.store.phase_ended(job.id, phase.value, error=exc.reason)
        log.error("phase.failed", reason=exc.reason)
        fail_job(rt, job, phase, exc.reason, exc.final)
        raise
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # Redis stayed away longer than tunables.redis_retry_for. Nothing is known to have
        # failed (a migration may well have completed): the phase stops without a verdict,
        # and recovery takes it up from libvirt's state once Redis is back.
        log.error("phase.interrupted", reason=f"Redis unreachable: {exc}")
        raise
    except Exception as exc:
        _unexpected(rt, job, phase, exc)
    rt.store.phase_ended(job.id, phase.value)
    log.info("phase.finished", duration_ms=round((time.monotonic() - started) * MS_PER_S, 1))
    if then is not None:
        advance(rt, job, then)
        if then in TERMINAL:
            job_ended(rt, job)
