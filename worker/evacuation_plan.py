"""An evacuation's plan: where each domain goes, and the migration that takes it there.

Shared by the planning (worker/evacuation.py), the children (worker/evacuation_children.py)
and the watch (worker/evacuation_watch.py); free of Celery and of the keeper.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from config.events import get_logger
from config.settings import ConfigError, Settings
from jobs.evacuation import Evacuation, EvacuationState, EvacuationStore, Placement
from jobs.evacuation_model import ENDED_FIELD
from jobs.keys import job_key
from jobs.policy_choice import effective_policy
from jobs.spec import MigrationSpec, first_error
from jobs.store import now
from worker.fleet_view import FleetView, gather
from worker.placement import Estimate, Guest, plan
from worker.runtime import Runtime
from worker.tls_facts import tls_refusal

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
            "policy": p.policy,
            "convergence": p.convergence,
            "offline": not p.active,
            "local_disks": p.local_disks,
            "group": p.group,
            "reason": p.reason,
        }
        for p in placements
    ]


def checked(
    settings: Settings, ev: Evacuation, placement: Placement, guest: Guest, estimate: Estimate
) -> Placement:
    """A placement drover cannot turn into a migration is unplaced, with why, at plan time
    (so the dry run shows it too): e.g. a name libvirt allows and drover refuses, or a policy
    (the evacuation's, or the one the domain's metadata names) this registry does not know.
    A placed one gets its child's policy, the estimate at that policy's pre-copy cap, and
    what the guest will need to converge when libvirt measured its dirty rate."""
    if placement.destination is None:
        return placement
    refusal = ev.spec.unplaceable(active=placement.active, local_disks=placement.local_disks > 0)
    if refusal is not None:
        return placement.model_copy(update={"destination": None, "reason": refusal})
    try:
        spec = child_spec(ev, placement)
        policy = effective_policy(settings, spec, guest.policy) if spec.live else None
    except ValidationError as exc:
        reason = f"cannot be migrated by drover: {first_error(exc)}"
        return placement.model_copy(update={"destination": None, "reason": reason})
    except ConfigError as exc:
        reason = f"cannot be migrated by drover: migration policy: {exc}"
        return placement.model_copy(update={"destination": None, "reason": reason})
    if policy is None:
        return placement
    return placement.model_copy(
        update={
            "policy": policy.name,
            "estimate_s": estimate.seconds(guest, policy.values.bandwidth_mib),
            "convergence": estimate.convergence(guest, policy.name, policy.values),
        }
    )


def planned(rt: Runtime, ev: Evacuation, view: FleetView) -> list[Placement]:
    """Every guest of `view` placed (worker/placement.py) and checked as above; a guest of
    an anti-affinity group is not placed when the groups on their way cannot be known (a
    limit refused rather than ignored, worker/fleet_view.py `groups_on_the_way`)."""
    tunables = rt.settings.tunables
    estimate = Estimate(tunables.estimate_startup_s, tunables.estimate_mib_per_s)
    guests = {g.uuid: g for g in view.guests}
    # A --tls drain from a host whose QEMU lacks the CA would have every child refused at
    # its preflight (worker/precheck_source.py): said here, where the dry run shows it.
    # Live guests only: a shut-off one moves offline, without TLS.
    source_tls = tls_refusal(rt.host, destination=False) if ev.spec.tls else None
    stuck = [g for g in view.guests if source_tls is not None and g.active]
    movable = [g for g in view.guests if g not in stuck]
    free, held = movable, []
    if view.groups_unknown is not None:  # a group's limit cannot be kept: none of it placed
        free = [g for g in movable if g.group is None]
        held = [g for g in movable if g.group is not None]
    placements = plan(free, view.candidates, view.unavailable, estimate)
    placements += [g.placement(f"no destination ({view.groups_unknown})") for g in held]
    placements += [g.placement(f"no destination ({source_tls})") for g in stuck]
    return [checked(rt.settings, ev, p, guests[p.uuid], estimate) for p in placements]


def child_spec(ev: Evacuation, placement: Placement) -> MigrationSpec:
    """The child migration of `placement` (jobs/evacuation_model.py `EvacuationSpec.child`)."""
    assert placement.destination is not None
    return ev.spec.child(
        placement.domain,
        placement.destination,
        active=placement.active,
        persistent=placement.persistent,
        local_disks=placement.local_disks > 0,
    )


def replanned(
    rt: Runtime,
    store: EvacuationStore,
    ev: Evacuation,
    placement: Placement,
    refusal: str | None = None,
) -> Placement:
    """`placement` placed again: its destination went into maintenance after planning
    (another evacuation of it), or its own pre-checks refused the child (`refusal`: libvirt
    there said no to what the published facts allowed, e.g. a guest of the anti-affinity
    group started there since, or its memory taken). The child was refused before perform,
    and the domain still has to leave. Placed by the same rules on what the fleet looks like
    now, leaving out every host that refused it (Nova's scheduler retries a live migration on
    another host the same way); saved in the plan, so the evacuation's end is judged against
    where it really went."""
    was = placement.destination
    refused_by = dict(placement.refused_by)
    if refusal is not None and was is not None:
        refused_by[was] = refusal
    current = store.get(ev.id)
    view = gather(rt, ev.spec, ev.id)
    view.guests = [g for g in view.guests if g.uuid == placement.uuid]
    view.candidates = [c for c in view.candidates if c.name not in refused_by]
    view.unavailable |= {host: f"refused it: {why}" for host, why in refused_by.items()}
    # The groups the rest of this plan sends to each host (probe: a re-placed guest joined a
    # member of its anti-affinity group this evacuation had sent there; gather counts other
    # evacuations' only, as a whole plan places its own guests together).
    for c in view.candidates:
        c.groups.update(
            p.group
            for p in current.plan or []
            if p.group is not None and p.destination == c.name and p.domain != placement.domain
        )
    if view.guests:
        (fresh,) = planned(rt, ev, view)
    else:
        fresh = placement.model_copy(
            update={"destination": None, "reason": f"no longer here to re-plan on {rt.host}"}
        )
    fresh = fresh.model_copy(update={"refused_by": refused_by})
    store.save_plan(ev.id, [fresh if p.domain == fresh.domain else p for p in current.plan or []])
    why = (
        f"{was}'s pre-checks refused it after planning: {refusal}"
        if refusal
        else f"{was} went into maintenance after planning"
    )
    log.warning(
        "evacuation.replanned",
        domain=placement.domain,
        was=was,
        dst=fresh.destination,
        reason=why + (f"; {fresh.reason}" if fresh.reason else ""),
    )
    return fresh


# Evacuations this process ended: one set back to a live state in Redis is never acted on
# again here (worker/evacuation.py `refusal`), whatever its record says. Bounded: the ids
# come from Redis.
ENDED_HERE: set[str] = set()
ENDED_HERE_MAX = 4096


def end(
    store: EvacuationStore,
    ev: Evacuation,
    final: EvacuationState,
    reason: str | None,
    **fields: Any,
) -> None:
    """End the evacuation, and mark it ended beyond its state: in this process, and in the
    record's `ended` field, which no transition removes."""
    moved, _ = store.transition(ev.id, final, reason)
    if moved:
        if len(ENDED_HERE) >= ENDED_HERE_MAX:
            ENDED_HERE.clear()
        ENDED_HERE.add(ev.id)
        store.r.hset(job_key(ev.id), ENDED_FIELD, now().isoformat())
        log.info("evacuation.state", state=final.value, reason=reason, **fields)
