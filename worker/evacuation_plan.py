"""An evacuation's plan: where each domain goes, and the migration that takes it there.

Shared by the planning (worker/evacuation.py), the children (worker/evacuation_children.py)
and the watch (worker/evacuation_watch.py); free of Celery and of the keeper.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from config.events import get_logger
from jobs.evacuation import Evacuation, EvacuationState, EvacuationStore, Placement
from jobs.spec import MigrationSpec, Transport, first_error
from worker.fleet_view import gather
from worker.placement import Estimate, plan
from worker.runtime import Runtime

log = get_logger()


def evacuation_context(ev: Evacuation) -> dict[str, Any]:
    return {"job_id": ev.id, "src": ev.spec.host, "phase": "evacuation"}


def plan_rows(placements: list[Placement]) -> list[dict[str, Any]]:
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


def checked(ev: Evacuation, placement: Placement) -> Placement:
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


def replanned(
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
        fresh = checked(ev, fresh)
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


def end(
    store: EvacuationStore,
    ev: Evacuation,
    final: EvacuationState,
    reason: str | None,
    **fields: Any,
) -> None:
    moved, _ = store.transition(ev.id, final, reason)
    if moved:
        log.info("evacuation.state", state=final.value, reason=reason, **fields)
