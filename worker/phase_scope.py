"""The frame around every phase: checks, context, bookkeeping, and failure handling.

Cross-cutting concerns live here (as dramatiq keeps them in middleware) so that each phase in
worker/phases.py reads as the handful of libvirt facts it checks and the one thing it does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from celery.exceptions import Ignore

from config.celery import app, host_queue
from config.events import get_logger
from jobs.model import Job
from jobs.phases import PHASE_ORDER, PHASE_SIDE, ROLLBACK_DESTINATION_TASK, Phase, Side
from jobs.states import JobState
from jobs.store import JobNotFound
from worker.runtime import Runtime

log = get_logger()
MS_PER_S = 1000


class PhaseFailed(Exception):
    """A phase cannot go on; `reason` is one line an operator can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def owner(job: Job, phase: Phase) -> str:
    return job.spec.src if PHASE_SIDE[phase] is Side.SOURCE else job.spec.dst


def advance(rt: Runtime, job: Job, target: JobState) -> None:
    """Move the job on, or stop this phase quietly if someone else already ended the job."""
    moved, previous = rt.store.transition(job.id, target, host=rt.host)
    if not moved:
        log.info("phase.skipped", reason=f"job is {previous}, not ready for {target}")
        raise Ignore()
    log.info("job.state", state=target.value, previous=previous.value if previous else None)


def fail_job(rt: Runtime, job: Job, phase: Phase, reason: str) -> None:
    """Record the failure once, free what the job held, and ask the destination to clean up."""
    moved, _ = rt.store.transition(job.id, JobState.FAILED, host=rt.host, reason=reason)
    rt.store.release(job.spec.dst, job.id)
    if not moved:
        return
    log.error("job.state", state=JobState.FAILED.value, reason=reason)
    if PHASE_ORDER.index(phase) >= PHASE_ORDER.index(Phase.DESTINATION_PREPARE):
        app.send_task(ROLLBACK_DESTINATION_TASK, args=(job.id,), queue=host_queue(job.spec.dst))


PhaseFn = Callable[[Runtime, Job], JobState | None]


def execute_phase(rt: Runtime, job_id: str, phase: Phase, fn: PhaseFn) -> None:
    """Run one phase inside its frame; the state `fn` returns is entered once it is done.

    Entering that state last keeps the job's terminal event the last one in its stream.
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
    context: dict[str, Any] = {
        "job_id": job.id,
        "domain": job.spec.domain,
        "src": job.spec.src,
        "dst": job.spec.dst,
        "phase": phase.value,
    }
    with structlog.contextvars.bound_contextvars(**context):
        if job.terminal:
            log.info("phase.skipped", reason=f"job already {job.state.value}")
            raise Ignore()
        started = time.monotonic()
        rt.store.phase_started(job.id, phase.value, rt.host)
        log.info("phase.started")
        try:
            then = fn(rt, job)
        except Ignore:
            rt.store.phase_ended(job.id, phase.value, error="skipped")
            raise
        except PhaseFailed as exc:
            rt.store.phase_ended(job.id, phase.value, error=exc.reason)
            log.error("phase.failed", reason=exc.reason)
            fail_job(rt, job, phase, exc.reason)
            raise
        except Exception as exc:
            reason = f"{phase.value} on {rt.host} failed unexpectedly: {exc}"
            rt.store.phase_ended(job.id, phase.value, error=reason)
            log.exception("phase.failed", reason=reason)
            fail_job(rt, job, phase, reason)
            raise PhaseFailed(reason) from exc
        rt.store.phase_ended(job.id, phase.value)
        log.info("phase.finished", duration_ms=round((time.monotonic() - started) * MS_PER_S, 1))
        if then is not None:
            advance(rt, job, then)
