"""Stopping a migration job, the same way whoever asks (an operator, an aborted evacuation).

A queued job never starts; one between preflight and migrating is cancelled and its
destination cleans up; a running migration gets an abort request that the source's monitor
turns into libvirt's abortJob. A finishing job is past the point of no return (also one whose
migration call returned well, before finish began), and so is a migration libvirt has
switched to post-copy (libvirt refuses to abort it: the guest runs on
the destination already), including one whose post-copy failed and is being recovered.
The guest stays where it was in every case but these last two. A stalled job (its owner's
worker away) is judged by the state it stalled in: one stalled in its migration only gets the
request, which the source's worker, back, carries out in libvirt (or finds the migration
completed); it is never marked cancelled while libvirtd may be moving its guest.

A cancel is told to the job's two hosts (`notify`: a signed notice each worker keeps in its
ledger, worker/cancel_notice.py): the record's `cancelled` alone was anyone's to write back
with the Redis password, and the job then ran (attacker probe).
"""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery
from celery.canvas import Signature

from config.celery import host_queue
from jobs.model import Job, migration_event
from jobs.phases import CANCEL_NOTICE_TASK, ROLLBACK_DESTINATION_TASK, Phase
from jobs.states import POSTCOPY_STATES, JobState
from jobs.store import JobStore

ABORT_REASON = "aborted by operator"
# A job may move on between reading its state and cancelling it; read again this often.
CANCEL_ATTEMPTS = 5


class TooLate(Exception):
    """The job has ended, is finishing or is in post-copy; the message is one line."""


def abort_job(
    store: JobStore,
    job_id: str,
    *,
    by: str,
    rollback: Callable[[Job], None],
    reason: str = ABORT_REASON,
    notify: Callable[[Job], None] | None = None,
) -> str:
    """Stop `job_id`; `rollback` asks its destination to clean up, `notify` tells both hosts
    of a cancel. Returns what happened."""
    store.get(job_id)  # JobNotFound before any flag is set
    for _ in range(CANCEL_ATTEMPTS):
        job = store.get(job_id)
        if job.terminal:
            raise TooLate(f"job {job_id} already {job.state.value}; nothing to abort")
        # A stalled job is where it stalled: its owner's worker is away, not its migration.
        state = job.stalled_from if job.state is JobState.STALLED else job.state
        if state is JobState.FINISHING or _migration_completed(job):
            raise TooLate(
                f"job {job_id} is finishing: libvirt completed the migration of "
                f"{job.spec.domain} to {job.spec.dst}, which is checking it there"
            )
        if state in POSTCOPY_STATES:
            raise TooLate(_recovering(job))
        if job.postcopy_since is not None:
            raise TooLate(_in_postcopy(job))
        store.request_abort(job_id, reason)
        if state is JobState.MIGRATING or (state is None and _migration_started(job)):
            now = store.get(job_id)
            if now.postcopy_since is not None or now.state in POSTCOPY_STATES:
                store.withdraw_abort(job_id)  # switched (or failed) while we asked
                raise TooLate(_in_postcopy(job))
            if job.state is JobState.STALLED:
                # libvirtd may well go on with the migration: only its source's worker, back,
                # can abort it there or find it completed. Cancelling here would be a lie.
                return (
                    f"abort requested: job {job_id} is stalled ({job.reason}); "
                    f"{job.spec.src}'s worker aborts the migration of {job.spec.domain} when "
                    "it is back, if libvirt still runs it"
                )
            return (
                f"abort requested: {job.spec.src} aborts the running migration of {job.spec.domain}"
            )
        # Only from the state just read: a job that moved on into `migrating` meanwhile is
        # aborted by its source's monitor (which sees the flag), never cancelled under it.
        moved, _ = store.transition(
            job_id, JobState.CANCELLED, host=by, reason=reason, only_from=job.state
        )
        if moved:
            _cancelled(store, job, by, reason)
            untold = _told(notify, job)
            if job.state is not JobState.QUEUED:
                rollback(job)
            return f"job {job_id} cancelled ({job.state.value}){untold}"
    return f"abort requested: {job.spec.src} stops the job of {job.spec.domain}"


def _told(notify: Callable[[Job], None] | None, job: Job) -> str:
    """Tell the job's hosts of its cancel; what to add to the answer when that failed (the
    cancel stands: the record says so, and nothing sends the job again)."""
    if notify is None:
        return ""
    try:
        notify(job)
    except Exception as exc:  # the broker away: said, never raised over a done cancel
        return (
            f"; its hosts could not be told ({exc}), so a Redis writer could start it again "
            "until its signed request expires"
        )
    return ""


def _migration_started(job: Job) -> bool:
    return Phase.PERFORM.value in job.phases


def _migration_completed(job: Job) -> bool:
    """libvirt's migration call returned without an error: perform ended well (its record)."""
    record = job.phases.get(Phase.PERFORM.value)
    return record is not None and record.ended is not None and record.error is None


def _in_postcopy(job: Job) -> str:
    return (
        f"job {job.id} is in post-copy: libvirt cannot abort a post-copy migration "
        f"({job.spec.domain} already runs on {job.spec.dst}); it completes there"
    )


def _recovering(job: Job) -> str:
    where = job.reason or f"{job.spec.domain} is between {job.spec.src} and {job.spec.dst}"
    return (
        f"job {job.id} is {job.state.value}: its post-copy failed and cannot be aborted "
        f"(the guest's newest memory is on {job.spec.dst}); {where}"
    )


def _cancelled(store: JobStore, job: Job, by: str, reason: str) -> None:
    event = migration_event(
        job.id, job.spec, "job.state", by, state=JobState.CANCELLED.value, reason=reason
    )
    store.append_event(job.id, event)


def rollback_sender(app: Celery, send: Callable[[Signature], None]) -> Callable[[Job], None]:
    """The `rollback` of `abort_job` for a caller that publishes with `send`: it asks the
    aborted job's destination to clean up."""

    def rollback(job: Job) -> None:
        send(
            app.signature(ROLLBACK_DESTINATION_TASK, args=(job.id,), queue=host_queue(job.spec.dst))
        )

    return rollback


def cancel_notifier(app: Celery, send: Callable[[Signature], None]) -> Callable[[Job], None]:
    """The `notify` of `abort_job` for a caller that publishes with `send`: a cancel notice
    to each of the job's hosts, valid as long as its request (config/security.py)."""

    def notify(job: Job) -> None:
        for host in dict.fromkeys((job.spec.src, job.spec.dst)):
            send(app.signature(CANCEL_NOTICE_TASK, args=(job.id,), queue=host_queue(host)))

    return notify
