"""Moving a job on and ending it: the state changes a phase makes, and what follows an end.

Shared by the phase frame (worker/phase_frame.py), the phases, recovery and evacuations: a
job is advanced or ended here only, so that whatever ends it frees what it held, asks the
destination to clean up where needed, and tells the listeners (admission, evacuations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from config.celery import app, host_queue
from config.events import get_logger
from jobs.abort import host_notifier
from jobs.admission_head import TERMINAL_NAMES, retake_slots, slots_of
from jobs.model import Job
from jobs.phases import PHASE_ORDER, ROLLBACK_DESTINATION_TASK, Phase
from jobs.request_signing import SECURITY_REASON, RequestRefused, check_job, verifier_for
from jobs.spec import migration_mode
from jobs.states import TERMINAL, JobState
from jobs.store import domain_lock_key, now
from worker.admission_pass import admit_waiting
from worker.phase_errors import PhaseFailed, PhaseSkipped
from worker.runtime import Runtime

log = get_logger()


def job_context(job: Job, phase: str | None) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "domain": job.spec.domain,
        "src": job.spec.src,
        "dst": job.spec.dst,
        "phase": phase,
        # Not `mode`: migration.completed's `mode` says pre-copy or post-copy.
        "migration_mode": migration_mode(job.spec),
    }


def ended_fields(job: Job) -> dict[str, Any]:
    """What a terminal `job.state` adds: the job's duration from its admission (its creation
    if it was never admitted), for the duration histogram (docs/metrics.md).

    Called after the job has ended, so it never raises: a duration it cannot compute (a time
    without an offset, one in the future, both written into Redis by hand) is left out, and
    the end's event, rollback and listeners still follow."""
    start = job.admitted or job.created
    try:
        duration_s = (now() - start).total_seconds()
    except (TypeError, ValueError, OverflowError):
        return {}
    return {"duration_s": round(duration_s, 3)} if duration_s >= 0 else {}


def advance(rt: Runtime, job: Job, target: JobState) -> None:
    """Move the job on, or stop this phase quietly if someone else already ended the job."""
    moved, previous = rt.store.transition(job.id, target, host=rt.host)
    entered(job, target, moved, previous)


def entered(job: Job, target: JobState, moved: bool, previous: JobState | None) -> None:
    """Say the state the job entered; or, when it had ended meanwhile, stop the phase."""
    if moved:
        was = previous.value if previous else None
        ended = ended_fields(job) if target in TERMINAL else {}
        log.info("job.state", state=target.value, previous=was, **ended)
    elif previous is not target:  # ended meanwhile (an abort, a failure elsewhere)
        log.info("phase.skipped", reason=f"job is {previous}, not ready for {target}")
        raise PhaseSkipped(f"job is {previous}")


def hold_domain(rt: Runtime, job: Job, uuid: str) -> None:
    """One active job per domain (by UUID), for as long as this job lives."""
    holder = rt.store.take_lease(domain_lock_key("uuid", uuid), job.id)
    if holder is not None:
        raise PhaseFailed(f"{job.spec.domain} ({uuid}) already has an active job {holder}")


def rollback_destination_later(job: Job) -> None:
    app.send_task(ROLLBACK_DESTINATION_TASK, args=(job.id,), queue=host_queue(job.spec.dst))


def notices_later(job: Job, task: str) -> None:
    """Tell the job's hosts of its cancel or abort (jobs/abort.py `host_notifier`)."""
    host_notifier(app, lambda sig: sig.apply_async())(job, task)


def touched_destination(phase: Phase) -> bool:
    """Whether the destination may hold something of the job once `phase` began."""
    return PHASE_ORDER.index(phase) >= PHASE_ORDER.index(Phase.DESTINATION_PREPARE)


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
    rt: Runtime,
    job: Job,
    phase: Phase,
    reason: str,
    final: JobState = JobState.FAILED,
    *,
    never_left: bool = False,
) -> None:
    """Record the end once, free what the job held, and ask the destination to clean up.

    After a verified finish the move is done whatever failed since: the job succeeds, with
    the failure as leftovers on the source (`succeed_with_leftovers`), and no rollback;
    unless libvirt showed that the guest `never_left` its source (the record lied).
    """
    moved = not never_left and moved_already(rt.store.get(job.id), phase)
    if final is JobState.FAILED and moved:
        succeed_with_leftovers(rt, job, reason)
        moved, previous = rt.store.transition(job.id, JobState.SUCCEEDED, host=rt.host)
        if moved:
            was = previous.value if previous else None
            log.info("job.state", state=JobState.SUCCEEDED.value, previous=was, **ended_fields(job))
            job_ended(rt, job)
        return
    _forged_end_taken_back(rt, job, phase)
    moved, _ = rt.store.transition(job.id, final, host=rt.host, reason=reason)
    if not moved:
        return
    log.error("job.state", state=final.value, reason=reason, **ended_fields(job))
    if touched_destination(phase):
        rollback_destination_later(job)
    job_ended(rt, job)


# Ends no phase before finish can meet: only confirm enters succeeded, only a dry run checked.
_NEVER_BEFORE_FINISH = frozenset({JobState.SUCCEEDED, JobState.CHECKED})


def _forged_end_taken_back(rt: Runtime, job: Job, phase: Phase) -> None:
    """A phase before finish is failing a job whose record says succeeded or checked: no
    drover step wrote that (a Redis write did, mid-migration: attacker probe), and the
    failure would be refused by it, leaving `succeeded` on a guest libvirt kept on its
    source. The record is taken back to the state the phase runs in, and the failure is
    then entered as usual (worker/contradicted_end.py takes back the ends finish meets)."""
    if PHASE_ORDER.index(phase) >= PHASE_ORDER.index(Phase.FINISH):
        return
    said = rt.store.get(job.id).state
    if said not in _NEVER_BEFORE_FINISH:
        return
    live = JobState.MIGRATING if phase is Phase.PERFORM else JobState.PREFLIGHT
    why = f"the record said {said.value} while {phase.value} ran on {rt.host}: no drover step"
    if rt.store.reopen(job.id, said, live, host=rt.host, reason=why):
        log.warning("job.reopened", reason=why, previous=said.value)


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
            log.error("job.state", state=JobState.FAILED.value, reason=reason, **ended_fields(job))
            job_ended(rt, job)
        return False
    return True


# (job, gate, event) said already in this process: said once, not at every sweep.
# Bounded: job ids are anyone's to write with the Redis password.
_NOTED_SLOTLESS: set[tuple[str, str, str]] = set()
_NOTED_SLOTLESS_MAX = 4096


def holds_slots(rt: Runtime, job: Job, *, resend: bool = False) -> bool:
    """Whether the job holds its slot in every gate admission gives it, so that a phase may
    start (or, `resend`, be sent again). `admitted` alone is no proof: anyone with the Redis
    password can write it; only the admit script takes slots, in the same step.

    A live job never loses a slot while drover runs it: they leave a gate only in the step
    that ends the job, or when pruned as a slot of an ended or vanished job; a lowered limit
    changes no membership; AOF keeps the sets through a restart. So a job found without one
    was never admitted (or its slot was removed by hand): refused, with the gate named
    (`message.rejected`; recovery sends nothing and says so once), unless one of its phases
    already ran on this host, as this host's ledger says (`job.slots_lost`, and it goes on).
    A dry run takes no slot; a job that ended meanwhile gave its slots back with its end and
    is skipped.
    """
    if job.spec.dry_run:
        return True
    slots = slots_of(rt.store.r, job.id, job.spec, job.parent, job.parent_limit)
    if not slots.missing:
        return True
    if slots.state in TERMINAL_NAMES:
        if not resend:
            log.info("phase.skipped", reason=f"job already {slots.state}")
        return False
    gate = ", ".join(slots.missing)
    if rt.ledger.ran_here(job.id):
        # Admitted when its earlier phase ran here: its slot went since (removed by hand, or
        # pruned while its record was written ended). Refusing now would leave the job for
        # ever in a state libvirt may contradict (its guest moved, finish refused).
        if _first_time(job.id, gate, "slots_lost"):
            log.warning("job.slots_lost", reason=f"its slot in {gate} went while it ran here")
        retake_slots(rt.store.r, job.id, job.spec, job.parent, job.parent_limit)
        return True
    reason = f"job holds no slot in {gate}: admission never started it"
    if not resend:
        log.warning("message.rejected", reason=reason)
    elif _first_time(job.id, gate, "rejected"):
        log.warning("message.rejected", reason=f"{reason}; its phase is not sent again")
    return False


def _first_time(job_id: str, gate: str, what: str) -> bool:
    """True the first time `what` is to be said of (job, gate) in this process."""
    if (job_id, gate, what) in _NOTED_SLOTLESS:
        return False
    if len(_NOTED_SLOTLESS) >= _NOTED_SLOTLESS_MAX:
        _NOTED_SLOTLESS.clear()
    _NOTED_SLOTLESS.add((job_id, gate, what))
    return True
