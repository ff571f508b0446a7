"""Stopping a migration job, the same way whoever asks (an operator, an aborted evacuation).

A queued job never starts; one between preflight and migrating is cancelled and its
destination cleans up; a running migration gets an abort request that the source's monitor
turns into libvirt's abortJob. A finishing job is past the point of no return. The guest
stays where it was in every case but the last, where it already runs on the destination.
"""

from __future__ import annotations

from collections.abc import Callable

from config.events import job_event
from jobs.model import Job
from jobs.states import JobState
from jobs.store import JobStore

ABORT_REASON = "aborted by operator"


class TooLate(Exception):
    """The job has ended or is finishing; the message is one line."""


def abort_job(
    store: JobStore,
    job_id: str,
    *,
    by: str,
    rollback: Callable[[Job], None],
    reason: str = ABORT_REASON,
) -> str:
    """Stop `job_id`; `rollback` asks its destination to clean up. Returns what happened."""
    job = store.get(job_id)
    if job.terminal:
        raise TooLate(f"job {job_id} already {job.state.value}; nothing to abort")
    if job.state is JobState.FINISHING:
        raise TooLate(
            f"job {job_id} is finishing: {job.spec.domain} already runs on {job.spec.dst}"
        )
    store.request_abort(job_id, reason)
    if job.state is JobState.MIGRATING:
        return f"abort requested: {job.spec.src} aborts the running migration of {job.spec.domain}"
    moved, previous = store.transition(job_id, JobState.CANCELLED, host=by, reason=reason)
    if not moved:
        return f"abort requested: {job.spec.src} aborts the running migration of {job.spec.domain}"
    event = job_event(
        "job.state",
        by,
        job_id=job_id,
        domain=job.spec.domain,
        src=job.spec.src,
        dst=job.spec.dst,
        state=JobState.CANCELLED.value,
        reason=reason,
    )
    store.append_event(job_id, event)
    if JobState(previous or "queued") is not JobState.QUEUED:
        rollback(job)
    return f"job {job_id} cancelled ({previous.value if previous else 'queued'})"
