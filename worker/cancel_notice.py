"""An operator's cancel of a job, or abort of its running migration, as this host keeps it.

A job cancelled before its migration (`drover abort`, an aborted evacuation) said so only in
its record, which anyone with the Redis password could write back to `queued` (with its
slots): admission started it again, and the guest moved against the operator's cancel
(attacker probe; its signed request stays good for `request_max_age`). So whoever cancels
also sends each of the job's hosts a signed notice (jobs/abort.py `host_notifier`), valid as
long as the request (config/security.py), queued behind nothing the job could still send:
the worker keeps it in its ledger, and no phase of the job runs here again, whatever the
record says; a record that says otherwise is set back to `cancelled` and the job's slots
are given back.

An abort of a running migration was the record's abort flag alone, which the same password
could delete as soon as it was set: the operator was told the migration would be aborted, and
it went on (attacker probe). Its source is told too; the worker keeps the abort in its ledger,
and the migration's monitor (worker/migration_watch.py) aborts it in libvirt from either word.
"""

from __future__ import annotations

import structlog

from config.events import get_logger
from jobs.abort import ABORT_REASON
from jobs.abort_request import genuine_abort
from jobs.model import Job
from jobs.request_signing import RequestRefused, verifier_for
from jobs.states import JobState
from jobs.store import JobNotFound, JobStore
from worker.job_end import ended_fields, job_context, job_ended
from worker.runtime import Runtime
from worker.said_once import SaidOnce

log = get_logger()
SOMEONE = "an operator"
_said_unsigned = SaidOnce()  # jobs whose unsigned abort flag was said passed over


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


def note_abort(rt: Runtime, job_id: str) -> None:
    """The abort notice's task: keep the operator's abort of the job's migration, with
    drover's own reason (every abort drover makes gives it; the record's flag is anyone's to
    write, and its words would become the job's reason)."""
    reason = ABORT_REASON
    rt.ledger.note_abort_asked(job_id, reason)
    with structlog.contextvars.bound_contextvars(job_id=job_id):
        log.info("abort.noted", reason=reason)


def abort_asked(rt: Runtime, job_id: str) -> str | None:
    """The operator's abort of the job's migration, which the monitor carries out in libvirt:
    this host's record of the signed notice first, else the record's flag. The flag still
    counts: a draining worker (a warm shutdown) takes no message from its queue, so the notice
    reaches it only once it is back, and its monitor must still see the abort meanwhile (the
    fault suite's warm shutdown cases); with signing on, only a flag its asker signed
    (`flagged_abort`). Raises what a Redis read raises."""
    return rt.ledger.abort_asked(job_id) or flagged_abort(rt, rt.store.without_retry, job_id)


def flagged_abort(rt: Runtime, store: JobStore, job_id: str) -> str | None:
    """The record's abort flag when it is one to act on: with signing on, one a trusted key
    signed for this job (jobs/abort_request.py). A flag no such key signed, written with the
    Redis password, made the source abort a migration no operator asked to stop; it is
    passed over, and said once (`security.rejected`)."""
    reason, signed = store.abort_request(job_id)
    try:
        return genuine_abort(verifier_for(rt.settings.security), job_id, reason, signed)
    except RequestRefused as exc:
        passed_over(_said_unsigned, job_id, exc)
        return None


def passed_over(said: SaidOnce, job_id: str, refused: RequestRefused) -> None:
    """Say once (`security.rejected`) that the abort flag of `job_id` (a job, or an
    evacuation) is not acted on, and why."""
    if said.first(job_id):
        reason = f"the record's abort flag is not acted on: {refused}"
        log.error("security.rejected", job_id=job_id, reason=reason)


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
