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
with the Redis password, and the job then ran (attacker probe). So is an abort of a running
migration, to its source: the record's abort flag alone was anyone's to delete, and the
migration went on after the operator was told it would be aborted.
"""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery
from celery.canvas import Signature

from config.celery import host_queue
from jobs.abort_request import sign_abort
from jobs.model import Job, migration_event
from jobs.phases import ABORT_NOTICE_TASK, CANCEL_NOTICE_TASK, ROLLBACK_DESTINATION_TASK, Phase
from jobs.request_signing import RequestSigner
from jobs.states import POSTCOPY_STATES, JobState
from jobs.store import JobStore

ABORT_REASON = "aborted by operator"
# `notify(job, task)`: tell the job's hosts with a notice of `task` (CANCEL_NOTICE_TASK: the
# job was cancelled; ABORT_NOTICE_TASK: its running migration is to be aborted).
Notify = Callable[[Job, str], None]
# A job may move on between reading its state and cancelling it; read again this often.
CANCEL_ATTEMPTS = 5


class TooLate(Exception):
    """The job has ended (`ended`), is finishing or is in post-copy; the message is one line."""

    def __init__(self, message: str, *, ended: bool = False) -> None:
        super().__init__(message)
        self.ended = ended


def abort_job(
    store: JobStore,
    job_id: str,
    *,
    by: str,
    rollback: Callable[[Job], None],
    reason: str = ABORT_REASON,
    notify: Notify | None = None,
    signer: RequestSigner | None = None,
) -> str:
    """Stop `job_id`; `rollback` asks its destination to clean up, `notify` tells both hosts
    of a cancel, and the source of an abort of its running migration; the abort flag is
    signed with `signer`'s key (jobs/abort_request.py). Returns what happened."""
    store.get(job_id)  # JobNotFound before any flag is set
    for _ in range(CANCEL_ATTEMPTS):
        job = store.get(job_id)
        if job.terminal:
            said = f"job {job_id} already {job.state.value}; nothing to abort"
            raise _too_late(notify, job, said, ended=True)
        # A stalled job is where it stalled: its owner's worker is away, not its migration.
        state = job.stalled_from if job.state is JobState.STALLED else job.state
        if state is JobState.FINISHING or _migration_completed(job):
            raise _too_late(
                notify,
                job,
                f"job {job_id} is finishing: libvirt completed the migration of "
                f"{job.spec.domain} to {job.spec.dst}, which is checking it there",
            )
        if state in POSTCOPY_STATES:
            raise _too_late(notify, job, _recovering(job))
        if job.postcopy_since is not None:
            raise _too_late(notify, job, _in_postcopy(job))
        store.request_abort(job_id, reason, sign_abort(signer, job_id, reason, by))
        if state is JobState.MIGRATING or (state is None and _migration_started(job)):
            now = store.get(job_id)
            if now.postcopy_since is not None or now.state in POSTCOPY_STATES:
                store.withdraw_abort(job_id)  # switched (or failed) while we asked
                raise _too_late(notify, job, _in_postcopy(job))
            untold = _told(notify, job, ABORT_NOTICE_TASK)
            if job.state is JobState.STALLED:
                # libvirtd may well go on with the migration: only its source's worker, back,
                # can abort it there or find it completed. Cancelling here would be a lie.
                return (
                    f"abort requested: job {job_id} is stalled ({job.reason}); "
                    f"{job.spec.src}'s worker aborts the migration of {job.spec.domain} when "
                    f"it is back, if libvirt still runs it{untold}"
                )
            return (
                f"abort requested: {job.spec.src} aborts the running migration of "
                f"{job.spec.domain}{untold}"
            )
        # Only from the state just read: a job that moved on into `migrating` meanwhile is
        # aborted by its source's monitor (which sees the flag), never cancelled under it.
        moved, _ = store.transition(
            job_id, JobState.CANCELLED, host=by, reason=reason, only_from=job.state
        )
        if moved:
            _cancelled(store, job, by, reason)
            untold = _told(notify, job, CANCEL_NOTICE_TASK)
            if job.state is not JobState.QUEUED:
                rollback(job)
            return f"job {job_id} cancelled ({job.state.value}){untold}"
    return f"abort requested: {job.spec.src} stops the job of {job.spec.domain}"


def _too_late(notify: Notify | None, job: Job, said: str, *, ended: bool = False) -> TooLate:
    """The refusal the job record calls for, with the source told all the same.

    The record's state and post-copy mark are anyone's to write with the Redis password: a
    migration written `succeeded`, `finishing` or in post-copy could not be aborted, and the
    operator was told so while libvirt went on moving the guest (attacker probe). The source
    is sent the abort notice whatever the record says; its worker aborts a migration libvirt
    still runs in pre-copy, and libvirt refuses one in post-copy (said in the job's events)."""
    if notify is None or _told(notify, job, ABORT_NOTICE_TASK):
        return TooLate(said, ended=ended)  # nobody told: the record's word is all there is
    return TooLate(
        f"{said} (the job record's word: {job.spec.src} was told all the same, and aborts a "
        "migration libvirt still runs in pre-copy)",
        ended=ended,
    )


def _told(notify: Notify | None, job: Job, task: str) -> str:
    """Tell the job's hosts with a notice of `task`; what to add to the answer when that
    failed (the cancel stands: the record says so, and nothing sends the job again; the
    abort stands on the record's flag, which the source's monitor also reads)."""
    if notify is None:
        return ""
    try:
        notify(job, task)
    except Exception as exc:  # the broker away: said, never raised over a done cancel
        if task == ABORT_NOTICE_TASK:
            return (
                f"; {job.spec.src} could not be told ({exc}): its worker aborts on the "
                "record's signed flag alone, which a Redis writer can delete, so ask again if "
                "the migration goes on"
            )
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


def host_notifier(app: Celery, send: Callable[[Signature], None]) -> Notify:
    """The `notify` of `abort_job` for a caller that publishes with `send`: a cancel notice
    to each of the job's hosts, an abort notice to its source (the one host that can abort
    the migration in libvirt); valid as long as its request (config/security.py)."""

    def notify(job: Job, task: str) -> None:
        both = (job.spec.src, job.spec.dst)
        hosts = (job.spec.src,) if task == ABORT_NOTICE_TASK else dict.fromkeys(both)
        for host in hosts:
            send(app.signature(task, args=(job.id,), queue=host_queue(host)))

    return notify
