"""An operator's cancel of a job, as this host keeps it.

A job cancelled before its migration (`drover abort`, an aborted evacuation) said so only in
its record, which anyone with the Redis password could write back to `queued` (with its
slots): admission started it again, and the guest moved against the operator's cancel
(attacker probe; its signed request stays good for `request_max_age`). So whoever cancels
also sends each of the job's hosts a signed notice (jobs/abort.py `cancel_notifier`), valid as
long as the request (config/security.py), queued behind nothing the job could still send:
the worker keeps it in its ledger, and no phase of the job runs here again, whatever the
record says; a record that says otherwise is set back to `cancelled` and the job's slots
are given back.
"""

from __future__ import annotations

import structlog

from config.events import get_logger
from jobs.model import Job
from jobs.states import JobState
from jobs.store import JobNotFound
from worker.job_end import ended_fields, job_context, job_ended
from worker.runtime import Runtime

log = get_logger()
SOMEONE = "an operator"


def note_cancel(rt: Runtime, job_id: str) -> None:
    """The notice's task: keep the cancel, and the record's word with it."""
    try:
        job: Job | None = rt.store.get(job_id)
    except JobNotFound:
        job = None
    by = _canceller(job)
    rt.ledger.note_cancelled(job_id, by)
    if job is None:
        log.info("cancel.noted", job_id=job_id, by=by)
        return
    with structlog.contextvars.bound_contextvars(**job_context(job, None)):
        log.info("cancel.noted", by=by)
        cancelled_here(rt, job)


def cancelled_here(rt: Runtime, job: Job) -> str | None:
    """Who cancelled `job`, if this host was told (None: it was not). A record that says the
    job lives is set back to `cancelled` first (said as `security.rejected`)."""
    by = rt.ledger.cancelled_by(job.id)
    if by is None or job.terminal:
        return by
    reason = (
        f"job {job.id} was cancelled by {by} (this host's record of the signed notice); its "
        f"record said {job.state.value}, written back since: nothing of it runs"
    )
    log.error("security.rejected", reason=reason)
    moved, _ = rt.store.transition(
        job.id, JobState.CANCELLED, host=rt.host, reason=reason, only_from=job.state
    )
    if moved:
        log.info("job.state", state=JobState.CANCELLED.value, reason=reason, **ended_fields(job))
        job_ended(rt, job)
    return by


def _canceller(job: Job | None) -> str:
    """Who the record says cancelled the job (for people: the notice itself is signed)."""
    if job is None:
        return SOMEONE
    for t in reversed(job.transitions):
        if t.state is JobState.CANCELLED:
            return t.host or SOMEONE
    return SOMEONE
