"""An evacuation's children: one migration per placed domain, each checked against what
the signed request allows and what libvirt shows here; a failed one queued again, aborted
ones stopped (see worker/evacuation.py)."""

from __future__ import annotations

from typing import Any

from config.events import get_logger
from jobs.abort import TooLate, abort_job
from jobs.evacuation import Evacuation, EvacuationStore, Genuine, Placement
from jobs.maintenance import Maintenance
from jobs.model import Job
from jobs.phases import Phase
from jobs.request_signing import (
    SECURITY_REASON,
    RequestRefused,
    check_job,
    signer_for,
    verifier_for,
)
from jobs.states import JobState
from jobs.submission import DomainBusy, enqueue
from worker.admission_pass import admit_waiting
from worker.evacuation_plan import child_spec, replanned
from worker.job_end import notices_later, rollback_destination_later
from worker.libvirt_host import facts
from worker.libvirt_states import has_job
from worker.local_disks import local_disk_paths
from worker.runtime import Runtime

log = get_logger()


def queue_children(rt: Runtime, store: EvacuationStore, ev: Evacuation) -> None:
    """One child per placed domain, once: a restarted worker skips those already queued, and
    so does one whose evacuation was set back to be planned again by hand, its list of
    children deleted (found by their own records: `children_of`)."""
    changed = False
    placements = list(ev.plan or [])
    queued = children_of(rt, ev)
    for i, placement in enumerate(placements):
        if placement.destination is None or placement.domain in {*ev.children, *queued}:
            continue
        if store.get(ev.id).abort_requested:
            log.info("evacuation.stopped_queueing", reason="evacuation aborted")
            break
        problem = _placement_problem(rt, ev, placement)
        if problem is not None:
            placements[i] = placement.model_copy(update={"destination": None, "reason": problem})
            changed = True
            log.error("security.rejected", domain=placement.domain, reason=problem)
            continue
        try:
            job_id = _queue_child(rt, ev, placement)
        except DomainBusy as exc:
            placements[i] = placement.model_copy(update={"destination": None, "reason": str(exc)})
            changed = True
            log.warning("evacuation.child_refused", domain=placement.domain, reason=str(exc))
            continue
        ev.children[placement.domain] = job_id
        if store.get(ev.id).abort_requested:
            # Asked while this child was being made (probe: the producer's abort listed the
            # children a moment before it was queued, and it migrated): stopped here, now.
            abort_children(rt, ev, {placement.domain: rt.store.get(job_id)})
            log.info("evacuation.stopped_queueing", reason="evacuation aborted")
            break
    if changed:
        store.save_plan(ev.id, placements)


def _placement_problem(rt: Runtime, ev: Evacuation, placement: Placement) -> str | None:
    """Why a placement read back from Redis must not become a migration this worker signs.

    The plan is kept in the record so that a restarted worker goes on with it, so anyone with
    the Redis password could have rewritten it: each child must go where the signed request
    allows, and be the guest libvirt shows here, as it is here.
    """
    spec, destination = ev.spec, placement.destination
    if destination is None:
        return None
    if destination == spec.host or destination not in rt.settings.hosts:
        return f"the plan sends {placement.domain} to {destination}, not a host it may use"
    if spec.to and destination not in spec.to:
        return f"the plan sends {placement.domain} to {destination}, outside --to"
    dom = rt.libvirt.by_name(placement.domain)
    if dom is None:
        return f"{placement.domain} is not defined on {rt.host}"
    here = facts(dom)
    if (here.uuid, here.active, here.persistent) != (
        placement.uuid,
        placement.active,
        placement.persistent,
    ):
        return f"the plan's facts of {placement.domain} are not what libvirt shows on {rt.host}"
    if spec.copy_storage is not None and placement.local_disks != len(
        local_disk_paths(dom.XMLDesc(0))
    ):
        return f"the plan's local disks of {placement.domain} are not what libvirt shows"
    if not here.active and not spec.include_inactive:
        return f"{placement.domain} is inactive and the evacuation did not include inactive ones"
    return None


def _queue_child(rt: Runtime, ev: Evacuation, placement: Placement, **event: Any) -> str:
    """Queue the migration of one placed domain; the job records itself as the child."""
    job_id = enqueue(
        rt.store,
        child_spec(ev, placement),
        origin=f"evacuation {ev.id}",
        parent=ev.id,
        parent_limit=ev.spec.max_parallel,
        reserve_mib=placement.memory_mib if placement.active else None,
        signer=signer_for(rt.settings.security),
    )
    log.info(
        "evacuation.child_queued",
        child=job_id,
        domain=placement.domain,
        dst=placement.destination,
        **event,
    )
    return job_id


def retry_failed(rt: Runtime, store: EvacuationStore, ev: Evacuation, job: Job) -> Job | None:
    """A child that failed with its guest still running here is queued once more (up to
    `evacuation_retries`): a worker restart or a network blip mid-migration should not leave
    a guest behind on a host going into maintenance. Returns the new child, or None."""
    if job.state is not JobState.FAILED or ev.abort_requested:
        return None
    forged = _child_problem(rt, ev, job)
    if forged is not None:
        log.error("security.rejected", domain=job.spec.domain, child=job.id, reason=forged)
        _not_retried(job, forged)
        return None
    placement = next((p for p in ev.plan or [] if p.domain == job.spec.domain), None)
    if placement is None or placement.destination is None:
        _not_retried(job, "it is not in the plan with a destination")
        return None
    here = rt.libvirt.by_uuid(placement.uuid)
    if here is None or bool(here.isActive()) != placement.active:
        # not as it was planned here: judged by _finish, not moved blindly
        _not_retried(job, f"libvirt on {rt.host} no longer shows it as planned")
        return None
    if has_job(here):
        # The record says failed, libvirt still migrates it (probe: a record written
        # `failed` mid-migration had a second child follow the first one's migration).
        _not_retried(job, f"libvirt on {rt.host} still migrates it: its child has not ended")
        return None
    problem = _placement_problem(rt, ev, placement)  # the plan is read back from Redis
    if problem is not None:
        log.error("security.rejected", domain=placement.domain, reason=problem)
        _not_retried(job, problem)
        return None
    limit = rt.settings.tunables.evacuation_retries
    # This host's count first: the one in Redis (shown with the evacuation) can be deleted.
    taken = rt.ledger.take_retry(ev.id, placement.domain, limit)
    if not (taken and store.take_retry(ev.id, placement.domain, limit)):
        _not_retried(job, f"its {limit} retries are spent")
        return None
    # Only a child this host never ran perform for (its own ledger: the record's phases are
    # anyone's to delete) was refused by its destination before anything moved.
    ran = rt.ledger.claimed(job.id, Phase.PERFORM.value)
    refusal = None if ran else destination_refusal(job, placement.destination)
    if refusal is not None or Maintenance(rt.store.r).refusal(placement.destination) is not None:
        placement = replanned(rt, store, ev, placement, refusal)
        if placement.destination is None:
            return None
    try:
        child = _queue_child(rt, ev, placement, retry_of=job.id, reason=job.reason)
    except DomainBusy as exc:
        log.warning("evacuation.child_refused", domain=placement.domain, reason=str(exc))
        return None
    admit_waiting(rt)
    return rt.store.get(child)


def destination_refusal(job: Job, destination: str) -> str | None:
    """What `destination`'s own pre-checks said when they refused the child, if that is what
    failed it (nothing moved; the same host would say it again, so the child goes elsewhere).

    The verdicts are the job record's, anyone's to write with the Redis password: a forged
    one can only send the guest to another host of the evacuation's own choice, whose
    pre-checks judge it again."""
    if Phase.PERFORM.value in job.phases:
        return None
    refused = [
        v.reason or v.check
        for v in job.result.destination_checks
        if not v.passed and v.host == destination
    ]
    return "; ".join(refused) or None


def _child_problem(rt: Runtime, ev: Evacuation, job: Job) -> str | None:
    """Why a failed child read back from Redis is not one this evacuation queued: its record
    (anyone's to write with the Redis password) must carry a request a trusted key signed,
    for this evacuation, before it is queued again (find_children matched its domain)."""
    verifier = verifier_for(rt.settings.security)
    if verifier is None:
        return None  # signing off (a lab): nothing is checked
    if job.parent != ev.id or job.spec.src != ev.spec.host:
        return f"{SECURITY_REASON}: job {job.id} is not a child of this evacuation"
    try:
        check_job(verifier, job)
    except RequestRefused as exc:
        return f"{SECURITY_REASON}: job {job.id}: {exc}"
    return None


def _not_retried(job: Job, why: str) -> None:
    """Say on the evacuation's stream why a failed child is not queued again."""
    log.info("evacuation.not_retried", domain=job.spec.domain, child=job.id, reason=why)


def _genuine(rt: Runtime, ev: Evacuation) -> Genuine:
    """Whether a record read back as a child carries a request a trusted key signed (for its
    parent evacuation too), a refused one said once; None with signing off (a lab)."""
    verifier = verifier_for(rt.settings.security)
    if verifier is None:
        return None

    def signed(job: Job) -> bool:
        try:
            check_job(verifier, job)
        except RequestRefused as exc:
            if EvacuationStore(rt.store).mark_reported(ev.id, f"forged:{job.id}"):
                reason = f"{SECURITY_REASON}: job {job.id}: {exc}"
                log.error("security.rejected", domain=job.spec.domain, child=job.id, reason=reason)
            return False
        return True

    return signed


def children_of(rt: Runtime, ev: Evacuation) -> dict[str, Job]:
    """Each domain's child job (jobs/evacuation.py `find_children`): one the children list
    no longer names (deleted or rewritten in Redis) is found by its own record, put back in
    the list, and said once; so is a record that cannot be read."""
    store = EvacuationStore(rt.store)
    found = store.find_children(ev, _genuine(rt, ev))
    for reason in found.unreadable:
        if store.mark_reported(ev.id, f"unreadable:{reason}"):
            log.warning("record.unreadable", evacuation_id=ev.id, reason=reason)
    if found.refound:
        store.restore_children(ev.id, {domain: job.id for domain, job in found.refound.items()})
    for domain, job in found.refound.items():
        if store.mark_reported(ev.id, f"refound:{job.id}"):
            log.warning(
                "evacuation.child_refound",
                domain=domain,
                child=job.id,
                reason="not in the evacuation's list of children: found by its own record, "
                "through the domain's lease or the host's job index, and put back",
            )
    return found.jobs


def abort_children(rt: Runtime, ev: Evacuation, children: dict[str, Job]) -> None:
    """Stop every child still live; asking again is harmless (and finishes an abort that
    was interrupted between its flag and its transition)."""
    for job in children.values():
        if job.terminal:
            continue
        try:
            abort_job(
                rt.store,
                job.id,
                by=rt.host,
                rollback=rollback_destination_later,
                notify=notices_later,
                signer=signer_for(rt.settings.security),
            )
        except TooLate:
            continue  # finishing: the guest already runs on its destination
