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

import structlog
from pydantic import ValidationError

from config.events import get_logger
from config.settings import ConfigError
from jobs.evacuation import EVACUATION_KIND, Evacuation, EvacuationState, EvacuationStore
from jobs.policy_choice import named_layers
from jobs.request_signing import SECURITY_REASON, RequestRefused, check_record, verifier_for
from jobs.spec import first_error
from worker.admission_pass import admit_waiting
from worker.evacuation_children import abort_children, children_of, queue_children
from worker.evacuation_plan import end, evacuation_context, plan_rows, planned
from worker.fleet_view import gather
from worker.libvirt_host import LibvirtError, LibvirtUnavailable
from worker.runtime import Runtime

log = get_logger()
PLANNING_KEY = "evacuation-planning"


def start(rt: Runtime, evacuation_id: str) -> None:
    """Plan the evacuation and queue its children (the body of the `drover.evacuate` task)."""
    store = EvacuationStore(rt.store)
    ev = store.get(evacuation_id)
    if ev.spec.host != rt.host:
        log.warning("message.rejected", reason=f"evacuation of {ev.spec.host}, not {rt.host}")
        return
    with structlog.contextvars.bound_contextvars(**evacuation_context(ev)), planning(rt, ev.id):
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
            end(store, ev, EvacuationState.FAILED, reason)
            return
        moved, previous = store.transition(ev.id, EvacuationState.PLANNING)
        if not moved:
            log.info("evacuation.skipped", reason=f"evacuation is {previous}, not queued")
            return
        plan_and_queue_or_fail(rt, store, ev)


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
