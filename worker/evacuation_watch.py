"""The keeper's duty for evacuations (every `evacuation_check_interval`, and as soon as a
child ends in this worker): report each child as it ends, queue a failed one again, and once
all have ended confirm through libvirt where every domain is and end the evacuation drained,
partial or cancelled (see worker/evacuation.py)."""

from __future__ import annotations

import time

import structlog

from config.celery import app, host_queue
from config.events import get_logger
from jobs.evacuation import DomainOutcome, Evacuation, EvacuationState, EvacuationStore
from jobs.model import Job
from jobs.phases import EVACUATE_TASK
from jobs.record import MalformedRecord
from jobs.record_read import REDIS_OUTAGES, KeyUnreadable
from jobs.store import JobNotFound, now
from worker.evacuation import PLANNING_KEY, attest, plan_and_queue_or_fail, planning, trusted
from worker.evacuation_abort import SignedAbortEvacuations
from worker.evacuation_children import abort_children, children_of, retry_failed
from worker.evacuation_outcome import confirm
from worker.evacuation_plan import end, evacuation_context
from worker.job_end import on_job_end
from worker.libvirt_host import list_domains
from worker.libvirt_states import has_job
from worker.runtime import Runtime

log = get_logger()
WATCH_KEY = "evacuation-watch"


def watch(rt: Runtime) -> None:
    """The keeper's duty: move on every live evacuation of this host.

    Each on its own: one whose record cannot be read (anyone with the Redis password can
    write one), or whose check fails, is said in one line and the others are still
    attended; a Redis outage ends the pass, as it would end every check after it. A set of
    live evacuations that Redis cannot read as a set is said at each pass.
    """
    try:
        evacuation_ids = EvacuationStore(rt.store).active_ids()
    except KeyUnreadable as exc:
        log.error("keeper.key_unreadable", duty="evacuations", key=exc.key, reason=str(exc))
        return
    for evacuation_id in evacuation_ids:
        try:
            check(rt, evacuation_id)
        except MalformedRecord as exc:
            log.warning("record.unreadable", evacuation_id=evacuation_id, reason=str(exc))
        except REDIS_OUTAGES:
            raise
        except Exception as exc:  # a bug or libvirt's error in one must not starve the rest
            log.exception(
                "keeper.error", duty="evacuations", evacuation_id=evacuation_id, error=str(exc)
            )


@on_job_end
def _child_ended(rt: Runtime, job: Job) -> None:
    """A child ended in this worker: its evacuation may be done now, not at the next tick."""
    if job.parent is not None:
        check(rt, job.parent)


def check(rt: Runtime, evacuation_id: str) -> None:
    """Move one evacuation on, if it is this host's; one check at a time per process.
    MalformedRecord when its record cannot be read (whose it is cannot be known)."""
    store = SignedAbortEvacuations(rt)
    with rt.holding(evacuation_id, WATCH_KEY) as ours:
        if not ours:
            return
        # Before reading: a planning that ends now must not be planned again.
        if rt.marked(evacuation_id, PLANNING_KEY):
            return
        try:
            ev = store.get(evacuation_id)
        except MalformedRecord:
            raise  # not gone: the caller says it cannot be read
        except JobNotFound:
            return
        if ev.spec.host != rt.host or ev.terminal:
            return
        with structlog.contextvars.bound_contextvars(**evacuation_context(ev)):
            # Its record is anyone's to write with the Redis password: nothing is planned,
            # queued, retried or aborted for it unless a trusted key asked for it as it reads.
            if not trusted(rt, store, ev):
                return
            if ev.state is not EvacuationState.QUEUED:
                attest(rt, store, ev)  # still ours, however long it runs
            _attend(rt, store, ev)


def _attend(rt: Runtime, store: EvacuationStore, ev: Evacuation) -> None:
    redispatch = rt.settings.tunables.redispatch_after
    if ev.state is EvacuationState.QUEUED:
        idle_s = (now() - ev.updated).total_seconds()
        if ev.abort_requested:
            end(store, ev, EvacuationState.CANCELLED, ev.abort_requested)
        elif idle_s > redispatch and store.may_redispatch(ev.id, redispatch):
            # The task message was lost: send it again (once per `redispatch_after`).
            log.warning("evacuation.redispatched", reason=f"not started after {idle_s:.0f}s")
            app.send_task(EVACUATE_TASK, args=(ev.id,), queue=host_queue(rt.host))
        return
    if ev.state is EvacuationState.PLANNING:
        # Planning here was interrupted (the worker restarted): finish it from what is saved.
        with planning(rt, ev.id):
            current = store.get(ev.id)
            if (current.spec, current.request) == (ev.spec, ev.request):  # what was checked
                plan_and_queue_or_fail(rt, store, current)
        return
    children = children_of(rt, ev)
    if ev.abort_requested:
        abort_children(rt, ev, children)
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
                retried = retry_failed(rt, store, ev, job)
            except Exception as exc:  # said on the evacuation's stream, not lost in a log
                log.exception(
                    "evacuation.retry_failed", domain=domain, child=job.id, reason=str(exc)
                )
                retried = None
            if retried is not None:
                children[domain] = retried
    if all(job.terminal for job in children.values()):
        _finish(rt, store, ev, children)


def _finish(rt: Runtime, store: EvacuationStore, ev: Evacuation, children: dict[str, Job]) -> None:
    """Confirm through libvirt where every domain is, then end the evacuation.

    `drained` needs every domain of the plan moved: its child succeeded, libvirt shows it on
    its destination, and nothing of it is left here; and no other domain that had to go is
    here. Anything else is `partial`, each domain that did not move listed with why. A
    destination whose libvirtd cannot be asked is asked again for a while (`_ask_again`).
    """
    if _still_migrating(rt, store, ev, children):
        return
    outcome = [confirm(rt, ev, p, children.get(p.domain)) for p in ev.plan or []]
    if _ask_again(rt, store, ev, outcome):
        return
    rt.confirm_waits.pop(ev.id, None)
    planned = {p.uuid for p in ev.plan or []}
    left = [
        dom.name()
        for dom in list_domains(rt.libvirt.conn)
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
    end(store, ev, final, reason, outcome=[o.model_dump() for o in outcome])


def _still_migrating(
    rt: Runtime, store: EvacuationStore, ev: Evacuation, children: dict[str, Job]
) -> bool:
    """Whether libvirt here still runs a job on a domain of the plan: its children's records
    all say they ended, but libvirt has the last word (probe: a child written `failed` in
    Redis mid-migration ended the evacuation `partial`, the guest said to be still here, while
    libvirt went on to land it). Judged again at the next check, said once per domain.

    An aborted evacuation waits only for its own children's: another job's migration of a
    guest it could not take (probe) held it `running` until that job ended."""
    busy = []
    for p in ev.plan or []:
        if ev.abort_requested and p.domain not in children:
            continue
        dom = rt.libvirt.by_uuid(p.uuid)
        if dom is not None and has_job(dom):
            busy.append(p.domain)
    for domain in busy:
        if store.mark_reported(ev.id, f"migrating:{domain}"):
            reason = f"libvirt on {rt.host} still migrates it: judged when that ends"
            log.warning("evacuation.confirm_deferred", domain=domain, reason=reason)
    return bool(busy)


def _ask_again(
    rt: Runtime, store: EvacuationStore, ev: Evacuation, outcome: list[DomainOutcome]
) -> bool:
    """Whether to leave the evacuation for the next check: a domain gone from here whose
    destination's libvirtd could not be asked is not known to be anywhere, and a daemon that
    restarts answers again soon. For `evacuation_confirm_wait` from the first time this
    process could not ask (its own clock: a time in Redis could hold it forever); said once
    per domain (`evacuation.confirm_deferred`). An aborted evacuation ends now."""
    unknown = [o for o in outcome if o.destination_unreachable is not None and not o.on_source]
    if not unknown or ev.abort_requested:
        return False
    since = rt.confirm_waits.setdefault(ev.id, time.monotonic())
    if time.monotonic() - since >= rt.settings.tunables.evacuation_confirm_wait:
        return False
    for o in unknown:
        if store.mark_reported(ev.id, f"unasked:{o.domain}"):
            log.warning(
                "evacuation.confirm_deferred", domain=o.domain, reason=o.destination_unreachable
            )
    return True
