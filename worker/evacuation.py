"""An evacuation, run by the worker of the host being emptied (see jobs/evacuation.py).

    start()    the `drover.evacuate` task (its host was disabled when it was started): gather
               facts, plan, save the plan; a dry run ends there; otherwise queue one child
               migration per placed domain (they start as the limits allow, jobs/admission.py)
    watch()    (worker/evacuation_watch.py) the keeper's duty, every
               `evacuation_check_interval`: report each child as it ends; once all have
               ended, confirm through libvirt where every domain is and end the
               evacuation drained, partial or cancelled

All state lives in Redis, so a worker that restarts picks its evacuations up where they were:
a plan is made once and children are queued once per domain.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import structlog
from pydantic import ValidationError

from config.events import get_logger
from config.settings import ConfigError
from jobs.evacuation import EVACUATION_KIND, Evacuation, EvacuationState, EvacuationStore
from jobs.evacuation_model import ENDED_FIELD, START_KIND, STARTED_FIELD
from jobs.keys import job_key
from jobs.policy_choice import named_layers
from jobs.request_signing import (
    REQUEST_FIELD,
    SECURITY_REASON,
    RequestRefused,
    check_record,
    signed_record,
    signer_for,
    verifier_for,
)
from jobs.spec import first_error
from jobs.store import now
from worker.admission_pass import admit_waiting
from worker.evacuation_abort import SignedAbortEvacuations
from worker.evacuation_children import abort_children, children_of, queue_children
from worker.evacuation_plan import ENDED_HERE, end, evacuation_context, plan_rows, planned
from worker.fleet_view import gather
from worker.libvirt_host import LibvirtError, LibvirtUnavailable
from worker.runtime import Runtime

log = get_logger()
PLANNING_KEY = "evacuation-planning"


def start(rt: Runtime, evacuation_id: str) -> None:
    """Plan the evacuation and queue its children (the body of the `drover.evacuate` task)."""
    store = SignedAbortEvacuations(rt)
    ev = store.get(evacuation_id)
    if ev.spec.host != rt.host:
        log.warning("message.rejected", reason=f"evacuation of {ev.spec.host}, not {rt.host}")
        return
    with structlog.contextvars.bound_contextvars(**evacuation_context(ev)), planning(rt, ev.id):
        if not trusted(rt, store, ev):
            return
        if ev.state is EvacuationState.QUEUED:
            attest(rt, store, ev)  # before planning: the watch goes on with it from here
        moved, previous = store.transition(ev.id, EvacuationState.PLANNING)
        if not moved:
            log.info("evacuation.skipped", reason=f"evacuation is {previous}, not queued")
            return
        plan_and_queue_or_fail(rt, store, ev)


def trusted(rt: Runtime, store: EvacuationStore, ev: Evacuation) -> bool:
    """Whether this worker may act on the evacuation as its record shows it (`refusal`).

    One it may not ends `failed` with a `security.rejected` event, and nothing else
    happens: no planning, no child queued, retried or aborted (the record is not to be
    believed about which jobs are its children). Call it with the evacuation's context bound.
    """
    why = refusal(rt, store, ev)
    if why is None:
        return True
    reason = f"{SECURITY_REASON}: {why}"
    log.error("security.rejected", reason=reason)
    end(store, ev, EvacuationState.FAILED, reason)
    return False


def refusal(rt: Runtime, store: EvacuationStore, ev: Evacuation) -> str | None:
    """Why the evacuation is not one a trusted key asked for, as its record shows it now.

    Anyone with the Redis password can write an evacuation's record, its state included:
    a planning one with no request at all, or an old, properly signed one set back to a live
    state. So, with signing on: the producer's request must verify for this id and this spec
    (jobs/request_signing.py), and be younger than `request_max_age` until this host's
    worker has started the evacuation; from then on its own signed word that it did (the
    `started` field, `attest`) must verify and be younger than that, and is renewed at each
    check while the evacuation lives, however long it runs. One that shows it ended (an
    `ended` field, a reason, or an end in this process) is never acted on again. What
    remains: an attacker who deletes the end's marks of an evacuation this process did not
    end can have it go on for up to `request_max_age` after its last check (within what its
    signed request allows). With signing off (a lab) nothing is checked.
    """
    verifier = verifier_for(rt.settings.security)
    if verifier is None:
        return None
    started, ended = cast(
        list[str | None], store.r.hmget(job_key(ev.id), [STARTED_FIELD, ENDED_FIELD])
    )
    if ended is not None or ev.reason is not None or ev.id in ENDED_HERE:
        return f"the evacuation had ended; its record was set back to {ev.state.value} by hand"
    max_age = rt.settings.tunables.request_max_age
    try:
        check_record(
            verifier,
            ev.request,
            ev.id,
            kind=EVACUATION_KIND,
            spec=ev.spec,
            max_age_s=max_age if started is None else None,
        )
        if started is not None:
            check_record(verifier, started, ev.id, kind=START_KIND, spec=ev.spec, max_age_s=max_age)
    except RequestRefused as exc:
        return str(exc) if started is None else f"its start: {exc}"
    return None


def attest(rt: Runtime, store: EvacuationStore, ev: Evacuation) -> None:
    """Sign, with this worker's key, that it started (and still runs) the evacuation."""
    signed = signed_record(
        signer_for(rt.settings.security),
        kind=START_KIND,
        job_id=ev.id,
        spec=ev.spec,
        origin=rt.host,
        at=now(),
    )
    if signed:
        store.r.hset(job_key(ev.id), STARTED_FIELD, signed[REQUEST_FIELD])


def plan_and_queue_or_fail(rt: Runtime, store: EvacuationStore, ev: Evacuation) -> None:
    """Planning that cannot go on ends the evacuation `failed`, with why; never a retry loop.

    Children already queued are aborted: an evacuation that failed must not keep moving
    guests on its own.
    """
    try:
        _plan_and_queue(rt, store, ev)
    except (LibvirtUnavailable, LibvirtError, ConfigError, ValidationError) as exc:
        reason = f"planning failed: {first_error(exc)}"
    except Exception as exc:  # a bug must end the evacuation, not spin in the keeper
        log.exception("evacuation.error", error=str(exc))
        reason = f"planning failed unexpectedly: {exc}"
    else:
        return
    current = store.get(ev.id)
    abort_children(rt, current, children_of(rt, current))
    end(store, current, EvacuationState.FAILED, reason)


@contextmanager
def planning(rt: Runtime, evacuation_id: str) -> Iterator[None]:
    """Mark an evacuation as being planned in this process (the watch leaves it alone)."""
    with rt.holding(evacuation_id, PLANNING_KEY):
        yield


def _plan_and_queue(rt: Runtime, store: EvacuationStore, ev: Evacuation) -> None:
    spec = ev.spec
    log.info("evacuation.state", state=EvacuationState.PLANNING.value, spec=spec.model_dump())
    # The host was disabled when the evacuation was started (jobs/evacuations.py), once.
    if ev.plan is None:
        if spec.policy is not None:  # checked where it was created; this registry may differ
            named_layers(rt.settings, spec.policy, "--policy")
        view = gather(rt, spec, ev.id)
        placements = planned(rt, ev, view)
        store.save_plan(ev.id, placements)
        log.info(
            "evacuation.planned",
            placements=plan_rows(placements),
            candidates={c.name: c.free_mib for c in view.candidates},
            unavailable=view.unavailable,
        )
        ev = store.get(ev.id)
    if spec.dry_run:
        end(store, ev, EvacuationState.PLANNED, None)
        return
    queue_children(rt, store, ev)
    store.transition(ev.id, EvacuationState.RUNNING)
    log.info("evacuation.state", state=EvacuationState.RUNNING.value, children=len(ev.children))
    admit_waiting(rt)
