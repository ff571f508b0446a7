"""An evacuation, run by the worker of the host being emptied (see jobs/evacuation.py).

    start()    the `drover.evacuate` task (its host was disabled when it was started): gather
               facts, plan, save the plan; a dry run ends there; otherwise queue one child
               migration per placed domain (they start as the limits allow, jobs/admission.py)
    watch()    the keeper's duty, every `evacuation_check_interval`: report each child as
               it ends; once all have ended, confirm through libvirt where every domain is
               and end the evacuation drained, partial or cancelled

All state lives in Redis, so a worker that restarts picks its evacuations up where they were:
a plan is made once and children are queued once per domain.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import libvirt
import structlog
from pydantic import ValidationError

from config.celery import app, host_queue
from config.events import get_logger
from config.settings import ConfigError
from jobs.abort import TooLate, abort_job
from jobs.evacuation import (
    EVACUATION_KIND,
    DomainOutcome,
    Evacuation,
    EvacuationState,
    EvacuationStore,
    Placement,
)
from jobs.maintenance import Maintenance
from jobs.model import Job
from jobs.phases import EVACUATE_TASK
from jobs.request_signing import (
    SECURITY_REASON,
    RequestRefused,
    check_record,
    signer_for,
    verifier_for,
)
from jobs.spec import MigrationSpec, Transport, first_error
from jobs.states import JobState
from jobs.store import JobNotFound, now
from jobs.submission import DomainBusy, enqueue
from worker.admission_pass import admit_waiting
from worker.fleet_view import gather
from worker.libvirt_host import LibvirtUnavailable, facts, on_peer
from worker.phase_scope import on_job_end, rollback_destination_later
from worker.placement import Estimate, plan
from worker.runtime import Runtime

log = get_logger()
PLANNING_KEY = "evacuation-planning"
WATCH_KEY = "evacuation-watch"


def _context(ev: Evacuation) -> dict[str, Any]:
    return {"job_id": ev.id, "src": ev.spec.host, "phase": "evacuation"}


def _plan_rows(placements: list[Placement]) -> list[dict[str, Any]]:
    return [
        {
            "domain": p.domain,
            "destination": p.destination,
            "memory_mib": p.memory_mib,
            "estimate_s": p.estimate_s,
            "offline": not p.active,
            "group": p.group,
            "reason": p.reason,
        }
        for p in placements
    ]


def start(rt: Runtime, evacuation_id: str) -> None:
    """Plan the evacuation and queue its children (the body of the `drover.evacuate` task)."""
    store = EvacuationStore(rt.store)
    ev = store.get(evacuation_id)
    if ev.spec.host != rt.host:
        log.warning("message.rejected", reason=f"evacuation of {ev.spec.host}, not {rt.host}")
        return
    with structlog.contextvars.bound_contextvars(**_context(ev)), _planning(rt, ev.id):
        try:
            check_record(
                verifier_for(rt.settings.security),
                ev.request,
                ev.id,
                kind=EVACUATION_KIND,
                spec=ev.spec,
            )
        except RequestRefused as exc:
            reason = f"{SECURITY_REASON}: {exc}"
            log.error("security.rejected", reason=reason)
            _end(store, ev, EvacuationState.FAILED, reason)
            return
        moved, previous = store.transition(ev.id, EvacuationState.PLANNING)
        if not moved:
            log.info("evacuation.skipped", reason=f"evacuation is {previous}, not queued")
            return
        _plan_and_queue_or_fail(rt, store, ev)


def _plan_and_queue_or_fail(rt: Runtime, store: EvacuationStore, ev: Evacuation) -> None:
    """Planning that cannot go on ends the evacuation `failed`, with why; never a retry loop.

    Children already queued are aborted: an evacuation that failed must not keep moving
    guests on its own.
    """
    try:
        _plan_and_queue(rt, store, ev)
    except (LibvirtUnavailable, libvirt.libvirtError, ConfigError, ValidationError) as exc:
        reason = f"planning failed: {first_error(exc)}"
    except Exception as exc:  # a bug must end the evacuation, not spin in the keeper
        log.exception("evacuation.error", error=str(exc))
        reason = f"planning failed unexpectedly: {exc}"
    else:
        return
    current = store.get(ev.id)
    _abort_children(rt, current, _children(rt, current))
    _end(store, current, EvacuationState.FAILED, reason)


@contextmanager
def _planning(rt: Runtime, evacuation_id: str) -> Iterator[None]:
    """Mark an evacuation as being planned in this process (the watch leaves it alone)."""
    key = (evacuation_id, PLANNING_KEY)
    with rt.lock:
        rt.running.add(key)
    try:
        yield
    finally:
        with rt.lock:
            rt.running.discard(key)


def _plan_and_queue(rt: Runtime, store: EvacuationStore, ev: Evacuation) -> None:
    spec = ev.spec
    log.info("evacuation.state", state=EvacuationState.PLANNING.value, spec=spec.model_dump())
    # The host was disabled when the evacuation was started (jobs/evacuations.py), once.
    if ev.plan is None:
        tunables = rt.settings.tunables
        view = gather(rt, spec, ev.id)
        estimate = Estimate(tunables.estimate_startup_s, tunables.estimate_mib_per_s)
        placements = [
            _checked(ev, p) for p in plan(view.guests, view.candidates, view.unavailable, estimate)
        ]
        store.save_plan(ev.id, placements)
        log.info(
            "evacuation.planned",
            placements=_plan_rows(placements),
            candidates={c.name: c.free_mib for c in view.candidates},
            unavailable=view.unavailable,
        )
        ev = store.get(ev.id)
    if spec.dry_run:
        _end(store, ev, EvacuationState.PLANNED, None)
        return
    _queue_children(rt, store, ev)
    store.transition(ev.id, EvacuationState.RUNNING)
    log.info("evacuation.state", state=EvacuationState.RUNNING.value, children=len(ev.children))
    admit_waiting(rt)


def _checked(ev: Evacuation, placement: Placement) -> Placement:
    """A placement drover cannot turn into a migration is unplaced, with why, at plan time
    (so the dry run shows it too): e.g. a name libvirt allows and drover refuses."""
    if placement.destination is None:
        return placement
    try:
        child_spec(ev, placement)
    except ValidationError as exc:
        reason = f"cannot be migrated by drover: {first_error(exc)}"
        return placement.model_copy(update={"destination": None, "reason": reason})
    return placement


def child_spec(ev: Evacuation, placement: Placement) -> MigrationSpec:
    """A live peer-to-peer migration; a persistent definition moves with the guest. An
    offline child moves only a definition: nothing to tunnel, cap, converge or time out."""
    assert placement.destination is not None
    return MigrationSpec(
        domain=placement.domain,
        src=ev.spec.host,
        dst=placement.destination,
        live=placement.active,
        offline=not placement.active,
        persistent=placement.persistent,
        undefine_source=placement.persistent,
        transport=(
            Transport.TUNNELLED if ev.spec.tunnelled and placement.active else Transport.NATIVE
        ),
        auto_converge=ev.spec.auto_converge and placement.active,
        bandwidth_mib=ev.spec.bandwidth_mib if placement.active else None,
        completion_timeout_s=ev.spec.completion_timeout_s if placement.active else None,
        timeout_action=ev.spec.timeout_action if placement.active else None,
    )


def _queue_children(rt: Runtime, store: EvacuationStore, ev: Evacuation) -> None:
    """One child per placed domain, once (a restarted worker skips those already queued)."""
    changed = False
    placements = list(ev.plan or [])
    for i, placement in enumerate(placements):
        if placement.destination is None or placement.domain in ev.children:
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


def _retry_failed(rt: Runtime, store: EvacuationStore, ev: Evacuation, job: Job) -> Job | None:
    """A child that failed with its guest still running here is queued once more (up to
    `evacuation_retries`): a worker restart or a network blip mid-migration should not leave
    a guest behind on a host going into maintenance. Returns the new child, or None."""
    if job.state is not JobState.FAILED or ev.abort_requested:
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
    limit = rt.settings.tunables.evacuation_retries
    if not store.take_retry(ev.id, placement.domain, limit):
        _not_retried(job, f"its {limit} retries are spent")
        return None
    if Maintenance(rt.store.r).refusal(placement.destination) is not None:
        placement = _replanned(rt, store, ev, placement)
        if placement.destination is None:
            return None
    try:
        child = _queue_child(rt, ev, placement, retry_of=job.id, reason=job.reason)
    except DomainBusy as exc:
        log.warning("evacuation.child_refused", domain=placement.domain, reason=str(exc))
        return None
    admit_waiting(rt)
    return rt.store.get(child)


def _not_retried(job: Job, why: str) -> None:
    """Say on the evacuation's stream why a failed child is not queued again."""
    log.info("evacuation.not_retried", domain=job.spec.domain, child=job.id, reason=why)


def _replanned(
    rt: Runtime, store: EvacuationStore, ev: Evacuation, placement: Placement
) -> Placement:
    """`placement` placed again, its destination having gone into maintenance after planning
    (another evacuation of it): the child was refused there before perform, and the domain
    still has to leave. Placed by the same rules on what the fleet looks like now; saved in
    the plan, so the evacuation's end is judged against where it really went."""
    tunables = rt.settings.tunables
    view = gather(rt, ev.spec, ev.id)
    guests = [g for g in view.guests if g.uuid == placement.uuid]
    estimate = Estimate(tunables.estimate_startup_s, tunables.estimate_mib_per_s)
    if guests:
        (fresh,) = plan(guests, view.candidates, view.unavailable, estimate)
        fresh = _checked(ev, fresh)
    else:
        fresh = placement.model_copy(
            update={"destination": None, "reason": f"no longer here to re-plan on {rt.host}"}
        )
    current = store.get(ev.id)
    store.save_plan(ev.id, [fresh if p.domain == fresh.domain else p for p in current.plan or []])
    log.warning(
        "evacuation.replanned",
        domain=placement.domain,
        was=placement.destination,
        dst=fresh.destination,
        reason=f"{placement.destination} went into maintenance after planning"
        + (f"; {fresh.reason}" if fresh.reason else ""),
    )
    return fresh


def watch(rt: Runtime) -> None:
    """The keeper's duty: move on every live evacuation of this host."""
    for evacuation_id in EvacuationStore(rt.store).active_ids():
        check(rt, evacuation_id)


@on_job_end
def _child_ended(rt: Runtime, job: Job) -> None:
    """A child ended in this worker: its evacuation may be done now, not at the next tick."""
    if job.parent is not None:
        check(rt, job.parent)


def check(rt: Runtime, evacuation_id: str) -> None:
    """Move one evacuation on, if it is this host's; one check at a time per process."""
    store = EvacuationStore(rt.store)
    with _marked(rt, evacuation_id, WATCH_KEY) as ours:
        if not ours:
            return
        with rt.lock:  # before reading: a planning that ends now must not be planned again
            if (evacuation_id, PLANNING_KEY) in rt.running:
                return
        try:
            ev = store.get(evacuation_id)
        except JobNotFound:
            return
        if ev.spec.host != rt.host or ev.terminal:
            return
        with structlog.contextvars.bound_contextvars(**_context(ev)):
            _attend(rt, store, ev)


@contextmanager
def _marked(rt: Runtime, evacuation_id: str, what: str) -> Iterator[bool]:
    """Mark (evacuation, what) as in hand in this process; False if it already was."""
    key = (evacuation_id, what)
    with rt.lock:
        if key in rt.running:
            ours = False
        else:
            rt.running.add(key)
            ours = True
    try:
        yield ours
    finally:
        if ours:
            with rt.lock:
                rt.running.discard(key)


def _attend(rt: Runtime, store: EvacuationStore, ev: Evacuation) -> None:
    redispatch = rt.settings.tunables.redispatch_after
    if ev.state is EvacuationState.QUEUED:
        idle_s = (now() - ev.updated).total_seconds()
        if ev.abort_requested:
            _end(store, ev, EvacuationState.CANCELLED, ev.abort_requested)
        elif idle_s > redispatch and store.may_redispatch(ev.id, redispatch):
            # The task message was lost: send it again (once per `redispatch_after`).
            log.warning("evacuation.redispatched", reason=f"not started after {idle_s:.0f}s")
            app.send_task(EVACUATE_TASK, args=(ev.id,), queue=host_queue(rt.host))
        return
    if ev.state is EvacuationState.PLANNING:
        # Planning here was interrupted (the worker restarted): finish it from what is saved.
        with _planning(rt, ev.id):
            _plan_and_queue_or_fail(rt, store, store.get(ev.id))
        return
    children = _children(rt, ev)
    if ev.abort_requested:
        _abort_children(rt, ev, children)
    for domain, job in list(children.items()):
        if job.terminal and store.mark_reported(ev.id, job.id):
            log.info(
                "evacuation.child_ended",
                child=job.id,
                domain=job.spec.domain,
                dst=job.spec.dst,
                state=job.state.value,
                reason=job.reason,
            )
            try:
                retried = _retry_failed(rt, store, ev, job)
            except Exception as exc:  # said on the evacuation's stream, not lost in a log
                log.exception(
                    "evacuation.retry_failed", domain=domain, child=job.id, reason=str(exc)
                )
                retried = None
            if retried is not None:
                children[domain] = retried
    if all(job.terminal for job in children.values()):
        _finish(rt, store, ev, children)


def _children(rt: Runtime, ev: Evacuation) -> dict[str, Job]:
    found = {}
    for domain, job_id in ev.children.items():
        try:
            found[domain] = rt.store.get(job_id)
        except JobNotFound:
            continue
    return found


def _abort_children(rt: Runtime, ev: Evacuation, children: dict[str, Job]) -> None:
    """Stop every child still live; asking again is harmless (and finishes an abort that
    was interrupted between its flag and its transition)."""
    for job in children.values():
        if job.terminal:
            continue
        try:
            abort_job(rt.store, job.id, by=rt.host, rollback=rollback_destination_later)
        except TooLate:
            continue  # finishing: the guest already runs on its destination


def _finish(rt: Runtime, store: EvacuationStore, ev: Evacuation, children: dict[str, Job]) -> None:
    """Confirm through libvirt where every domain is, then end the evacuation.

    `drained` needs every domain of the plan moved: its child succeeded, libvirt shows it on
    its destination, and nothing of it is left here; and no other domain that had to go is
    here. Anything else is `partial`, each domain that did not move listed with why.
    """
    outcome = [_confirm(rt, ev, p, children.get(p.domain)) for p in ev.plan or []]
    planned = {p.uuid for p in ev.plan or []}
    left = [
        dom.name()
        for dom in rt.libvirt.conn.listAllDomains()
        if dom.UUIDString() not in planned
        and (dom.isActive() or (ev.spec.include_inactive and dom.isPersistent()))
    ]
    store.save_outcome(ev.id, outcome, left)
    not_moved = [o for o in outcome if not o.moved]
    if ev.abort_requested:
        final, reason = EvacuationState.CANCELLED, ev.abort_requested
    elif not not_moved and not left:
        final, reason = EvacuationState.DRAINED, None
    else:
        names = [f"{o.domain} ({o.reason})" for o in not_moved] + [
            f"{name} (appeared after planning)" for name in left
        ]
        final = EvacuationState.PARTIAL
        reason = f"{len(names)} domain(s) not moved off {ev.spec.host}: " + "; ".join(names)
    _end(store, ev, final, reason, outcome=[o.model_dump() for o in outcome])


def _on_destination(rt: Runtime, placement: Placement) -> str | None:
    """The destination, if its libvirtd shows the domain there as the plan meant it."""
    if placement.destination is None:
        return None
    try:
        uri = rt.settings.host(placement.destination).peer_uri
    except ConfigError:
        return None  # removed from the registry since: not confirmed
    there = on_peer(uri, placement.uuid)
    if there is not None and (there.active or not placement.active):
        return placement.destination
    return None


def _confirm(rt: Runtime, ev: Evacuation, placement: Placement, job: Job | None) -> DomainOutcome:
    here = rt.libvirt.by_uuid(placement.uuid)
    on_source = here is not None and (
        bool(here.isActive()) or (bool(here.isPersistent()) and placement.persistent)
    )
    running_on = _on_destination(rt, placement)
    succeeded = job is not None and job.state is JobState.SUCCEEDED
    moved = succeeded and not on_source and running_on is not None
    reason = placement.reason
    if job is None and placement.destination is not None:
        reason = "never queued: the evacuation was stopped first"
    if job is not None and not succeeded:
        reason = f"job {job.id} {job.state.value}: {job.reason}"
    elif succeeded and not moved:
        seen = f"on {ev.spec.host}" if on_source else f"not on {placement.destination}"
        reason = f"job {job.id if job else '-'} succeeded but libvirt shows it {seen}"
    if not moved and not on_source and running_on is None and job is not None:
        reason = f"{reason}; libvirt shows it neither here nor on {placement.destination}"
    return DomainOutcome(
        domain=placement.domain,
        job_id=job.id if job else None,
        job_state=job.state.value if job else None,
        on_source=on_source,
        running_on=running_on,
        moved=moved,
        reason=None if moved else reason,
    )


def _end(
    store: EvacuationStore,
    ev: Evacuation,
    final: EvacuationState,
    reason: str | None,
    **fields: Any,
) -> None:
    moved, _ = store.transition(ev.id, final, reason)
    if moved:
        log.info("evacuation.state", state=final.value, reason=reason, **fields)
