"""Recovering a post-copy migration that failed: the guest is paused on the source ("paused
(post-copy failed)") and hung on the destination ("running (post-copy failed)", QEMU
`postcopy-paused`), and runs nowhere until the migration is resumed.

Whatever broke it (the link to the destination cut past libvirt's keepalive, the migration
stream reset), libvirt cannot roll a post-copy back: the guest's newest memory is on the
destination. So the job is neither failed nor its holds released. It enters
`postcopy_recovering` (lease, reservations and slots kept) and the same migration call is
made again with VIR_MIGRATE_POSTCOPY | VIR_MIGRATE_POSTCOPY_RESUME as soon as the
destination answers, with a back-off (tunables.postcopy_resume_delay, doubling up to
postcopy_resume_max_delay), until libvirt shows the guest running on the destination only.
When libvirt refuses the resume because QEMU says the old stream still runs (a link cut the
TCP stream outlived: it may go on, or hang for as long as TCP keeps retrying) for
tunables.postcopy_stall_timeout, the stream is interrupted (VIR_DOMAIN_ABORT_JOB_POSTCOPY)
so that the next resume can take over.
Then the job goes back to `migrating` and on to finish and confirm. Past
tunables.postcopy_recovery_timeout drover stops trying: the job enters `postcopy_paused`,
still holding everything, its reason saying where the guest is and how to resume it; once
libvirt shows it landed (resumed by hand) the job goes on.

When libvirt shows that no resume can land the guest any more (the destination's copy
destroyed, its QEMU killed, or the source's copy gone: `Whereabouts.beyond_resume`, seen on two
looks in a row) the job fails with what libvirt shows (`postcopy.lost`): nothing is resumed on
stale memory, the holds are released, and the destination's images are kept (they may hold
the guest's newest disk writes: worker/rollback.py).

Both the running perform (worker/phase_perform.py) and a worker restarted after a crash
(worker/recovery_perform.py) come here. Every step is an event (docs/events.md):
postcopy.failed, postcopy.waiting, postcopy.resuming, postcopy.resume_failed,
postcopy.interrupted, postcopy.resumed, postcopy.unrecovered, postcopy.lost.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Literal, NoReturn

import libvirt

from config.events import get_logger
from jobs.model import Job
from jobs.states import JobState
from jobs.store import now
from worker.libvirt_host import LibvirtError, LibvirtUnavailable
from worker.migration_call import MigrationCall, invoke, resume_call
from worker.phase_errors import HandedOver, PhaseFailed
from worker.phase_source import job_domain
from worker.postcopy_whereabouts import Whereabouts, locate
from worker.runtime import Runtime

log = get_logger()
# How long the destination's libvirtd may take to answer one look (a cut link never does).
ANSWER_WITHIN_S = 5.0
# Looks in a row (a back-off apart) that must show a post-copy beyond resume before the job
# fails: one look could catch a libvirtd that has just restarted and not yet re-attached.
LOOKS_BEYOND_RESUME = 2
ResumeOutcome = Literal["resumed", "still_running", "failed"]


class PostcopyLost(PhaseFailed):
    """libvirt shows a post-copy no resume can land any more: the job fails with that."""


class PostcopyUnrecovered(HandedOver):
    """drover stopped resuming a failed post-copy: perform stays started (the job live, its
    holds kept) for the recovery sweep, which goes on once libvirt shows the guest landed."""


def recover_failed_postcopy(
    rt: Runtime, job: Job, call: MigrationCall, error: str | None = None
) -> bool:
    """After the migration call failed (`error`): False when libvirt shows no post-copy
    (the caller judges the failure as before); True once a failed post-copy was resumed and
    the guest runs on the destination only. PostcopyUnrecovered past the deadline."""
    if job.spec.offline:
        return False
    job = rt.store.get(job.id)  # the switch to post-copy may postdate the phase's copy
    seen = locate(rt, job, ANSWER_WITHIN_S)
    if not seen.in_postcopy and not (job.postcopy_since is not None and seen.landed):
        return False
    if seen.landed:  # the call failed, but the guest got there all the same
        _back_to_migrating(rt, job, f"post-copy completed despite: {error}", seen)
        return True
    reason = f"post-copy failed ({error or 'libvirt shows it'}); {seen.describe()}: resuming"
    _enter(rt, job, JobState.POSTCOPY_RECOVERING, reason)
    log.error("postcopy.failed", error=error, reason=reason, where=seen.describe())
    return resume_until_landed(rt, rt.store.get(job.id), call)


def resume_until_landed(rt: Runtime, job: Job, call: MigrationCall) -> bool:
    """Resume the job's failed post-copy whenever the destination answers, backing off,
    until libvirt shows the guest on the destination only: True. PostcopyUnrecovered once
    the deadline (from when the job entered `postcopy_recovering`) has passed."""
    tunables = rt.settings.tunables
    deadline = _recovering_since(job) + timedelta(seconds=tunables.postcopy_recovery_timeout)
    delay, attempt, waiting, resumed = tunables.postcopy_resume_delay, 0, False, False
    refused_since: float | None = None  # first of the current run of "still running" refusals
    beyond = 0  # looks in a row that showed no resume can land it
    while True:
        seen = locate(rt, job, ANSWER_WITHIN_S)
        if seen.landed:
            _back_to_migrating(rt, job, _how(resumed, attempt, job.spec.dst), seen)
            return True
        why = seen.beyond_resume()
        beyond = beyond + 1 if why is not None else 0
        if why is not None and beyond >= LOOKS_BEYOND_RESUME:
            _lost(job, seen, why)
        if now() >= deadline:
            _give_up(rt, job, seen)
        if not seen.reachable:
            if not waiting:  # said once per outage, not on every look
                log.warning("postcopy.waiting", reason=seen.describe(), retry_in=delay)
            waiting = True
        elif seen.resumable:
            waiting = False
            attempt += 1
            outcome = _resume(rt, job, call, attempt, seen, delay)
            resumed = outcome == "resumed"
            if resumed:
                continue  # libvirt says it completed: look again, without waiting
            if outcome == "still_running":
                refused_since = refused_since or time.monotonic()
                stalled_s = time.monotonic() - refused_since
                if stalled_s >= tunables.postcopy_stall_timeout:
                    _interrupt(rt, job, seen, stalled_s)
                    # QEMU pauses the stream in its own time: the first wait, then resume.
                    refused_since, delay = None, tunables.postcopy_resume_delay
            else:
                refused_since = None
        time.sleep(delay)
        delay = min(delay * 2, tunables.postcopy_resume_max_delay)


def _how(resumed: bool, attempts: int, dst: str) -> str:
    """How it landed, truthfully: by drover's resume, or by the migration going on by itself
    once the peers reached each other again (libvirt then refuses the resume calls)."""
    if resumed:
        return f"post-copy resumed (VIR_MIGRATE_POSTCOPY_RESUME, try {attempts})"
    refused = f" ({attempts} resume tries refused)" if attempts else ""
    return f"post-copy went on by itself once {dst} answered again{refused}"


def _resume(
    rt: Runtime, job: Job, call: MigrationCall, attempt: int, seen: Whereabouts, delay: float
) -> ResumeOutcome:
    """One VIR_MIGRATE_POSTCOPY_RESUME call: "resumed" once libvirt returned without an error
    (the call returns once the rest of the memory is copied), "still_running" when libvirt
    refused it as an invalid operation (QEMU says the old stream still runs), else "failed"."""
    dom = job_domain(rt, job, job.spec.domain)
    if dom is None:
        return "failed"
    log.info("postcopy.resuming", attempt=attempt, where=seen.describe())
    try:
        invoke(dom, resume_call(call), rt.libvirt.reach)
    except LibvirtUnavailable as exc:  # the destination still cannot be opened: try again
        log.warning("postcopy.resume_failed", attempt=attempt, error=str(exc), retry_in=delay)
        return "failed"
    except LibvirtError as exc:
        log.warning(
            "postcopy.resume_failed", attempt=attempt, error=exc.get_error_message(), retry_in=delay
        )
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
            return "still_running"
        return "failed"
    return "resumed"


def _interrupt(rt: Runtime, job: Job, seen: Whereabouts, stalled_s: float) -> None:
    """Interrupt the old post-copy stream libvirt says still runs, so a resume can replace
    it: the guest stays paused on the source, its memory where it was."""
    dom = job_domain(rt, job, job.spec.domain)
    if dom is None:
        return
    reason = (
        f"resume refused for {stalled_s:.0f}s while QEMU says the old stream still runs: "
        "interrupted it (VIR_DOMAIN_ABORT_JOB_POSTCOPY) to resume it"
    )
    try:
        dom.abortJobFlags(libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY)
    except LibvirtError as exc:
        log.warning("postcopy.interrupted", reason=reason, error=exc.get_error_message())
        return
    log.warning("postcopy.interrupted", reason=reason, where=seen.describe())


def check_paused(rt: Runtime, job: Job) -> bool:
    """A job drover gave up on (`postcopy_paused`): whether libvirt now shows its guest
    landed (someone resumed it), then the job goes on. Quiet otherwise: asked every tick."""
    seen = locate(rt, job, ANSWER_WITHIN_S)
    if seen.beyond_resume() is not None:
        time.sleep(rt.settings.tunables.postcopy_resume_delay)  # a second look, as above
        seen = locate(rt, job, ANSWER_WITHIN_S)
        why = seen.beyond_resume()
        if why is not None:
            _lost(job, seen, why)
    if not seen.landed:
        return False
    _back_to_migrating(rt, job, "post-copy resumed outside drover", seen)
    return True


def _lost(job: Job, seen: Whereabouts, why: str) -> NoReturn:
    """Fail the job with what libvirt shows: no resume can land it. Nothing is resumed (the
    source's copy, if paused, would run on memory older than the guest's last run)."""
    reason = (
        f"post-copy cannot be resumed: {why}; {seen.describe()}. drover resumes nothing; "
        f"what to keep of {job.spec.domain} is the operator's call (virsh)"
    )
    log.error("postcopy.lost", reason=reason, where=seen.describe())
    raise PostcopyLost(reason)


def _recovering_since(job: Job) -> datetime:
    entered = [t.at for t in job.transitions if t.state is JobState.POSTCOPY_RECOVERING]
    return entered[-1] if entered else now()


def _enter(rt: Runtime, job: Job, state: JobState, reason: str) -> None:
    moved, previous = rt.store.transition(job.id, state, host=rt.host, reason=reason)
    if moved:
        was = previous.value if previous else None
        log.warning("job.state", state=state.value, previous=was, reason=reason)


def _back_to_migrating(rt: Runtime, job: Job, how: str, seen: Whereabouts) -> None:
    log.info("postcopy.resumed", reason=how, where=seen.describe())
    if rt.store.state(job.id) is not JobState.MIGRATING:
        _enter(rt, job, JobState.MIGRATING, how)


def _give_up(rt: Runtime, job: Job, seen: Whereabouts) -> None:
    spec, timeout = job.spec, rt.settings.tunables.postcopy_recovery_timeout
    reason = (
        f"post-copy could not be resumed within {timeout:.0f}s: {seen.describe()}. drover "
        f"stopped trying and keeps the job's holds: resume it on {spec.src} with `virsh "
        f"migrate --postcopy --postcopy-resume {spec.domain} ...`; the job goes on once "
        f"libvirt shows it running on {spec.dst}"
    )
    _enter(rt, job, JobState.POSTCOPY_PAUSED, reason)
    log.error("postcopy.unrecovered", reason=reason, where=seen.describe())
    raise PostcopyUnrecovered(reason)
