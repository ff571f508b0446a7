"""Where each domain of an evacuation's plan is when the evacuation ends, as libvirt shows it
on the host being drained and where the domain went: the outcome the evacuation is judged
by (worker/evacuation_watch.py), never what a child's record says."""

from __future__ import annotations

from dataclasses import dataclass

from config.settings import ConfigError
from jobs.evacuation import DomainOutcome, Evacuation, Placement
from jobs.model import Job
from jobs.states import JobState
from worker.libvirt_host import LibvirtUnavailable
from worker.runtime import Runtime


@dataclass(frozen=True)
class DestinationView:
    """What a placement's destination said of its domain: the host, when its libvirtd shows
    the domain as the plan meant it; or why that libvirtd could not be asked."""

    running_on: str | None = None
    state: str | None = None  # libvirt's state of the domain there, when it is as planned
    unreachable: str | None = None


def _on_destination(
    rt: Runtime, ev: Evacuation, placement: Placement, job: Job | None
) -> DestinationView:
    """Asked of the host the child's signed request sent the guest to (the plan, anyone's to
    rewrite in Redis, only when no child was queued); never of the host being drained."""
    destination = job.spec.dst if job is not None else placement.destination
    if destination is None or destination == ev.spec.host:
        return DestinationView()
    return _asked(rt, destination, placement)


def _elsewhere(rt: Runtime, ev: Evacuation, placement: Placement) -> DestinationView:
    """Where a domain the plan could not place (it had a job of its own, say) is, once libvirt
    shows it gone from here: every other host of the registry is asked. The host is drained
    of it wherever it went (probe: a guest another job moved off during the evacuation was
    said "not moved off" by the reason it was not placed)."""
    unasked = []
    for host in sorted(rt.settings.hosts):
        if host == ev.spec.host:
            continue
        view = _asked(rt, host, placement)
        if view.running_on is not None:
            return view
        if view.unreachable is not None:
            unasked.append(f"{host}: {view.unreachable}")
    return DestinationView(unreachable="; ".join(unasked) or None)


def _asked(rt: Runtime, host: str, placement: Placement) -> DestinationView:
    """What `host`'s libvirtd shows of the placement's domain, over the registry's peer URI."""
    try:
        uri = rt.settings.host(host).peer_uri
    except ConfigError:
        return DestinationView()  # removed from the registry since: not confirmed
    try:
        there = rt.libvirt.peer_facts(uri, placement.uuid)
    except LibvirtUnavailable as exc:
        return DestinationView(unreachable=str(exc))
    if there is not None and (there.active or not placement.active):
        return DestinationView(running_on=host, state=there.state)
    return DestinationView()


def confirm(rt: Runtime, ev: Evacuation, placement: Placement, job: Job | None) -> DomainOutcome:
    here = rt.libvirt.by_uuid(placement.uuid)
    # Any copy of it libvirt has here, running or defined: the plan's word on what it was
    # (`persistent`) is anyone's to rewrite, and a definition left behind is not drained.
    on_source = here is not None and (bool(here.isActive()) or bool(here.isPersistent()))
    view = _on_destination(rt, ev, placement, job)
    if job is None and placement.destination is None and not on_source:
        view = _elsewhere(rt, ev, placement)  # taken by no child: moved by another job?
    # libvirt's word on both hosts, whatever the child job says: the host is drained of the
    # guest when its libvirtd no longer has it and the destination's runs it (a child that
    # failed on a fault after its guest had moved does not keep the host "not drained").
    moved = not on_source and view.running_on is not None
    return DomainOutcome(
        domain=placement.domain,
        job_id=job.id if job else None,
        job_state=job.state.value if job else None,
        on_source=on_source,
        running_on=view.running_on,
        destination_state=view.state,
        destination_unreachable=view.unreachable,
        moved=moved,
        reason=None if moved else _why_not_moved(ev, placement, job, on_source, view),
    )


def _why_not_moved(
    ev: Evacuation, placement: Placement, job: Job | None, on_source: bool, view: DestinationView
) -> str | None:
    """What libvirt showed, on both hosts, of a domain that did not move; never more than it
    showed (a destination that could not be asked is said to be so)."""
    src, dst = ev.spec.host, job.spec.dst if job is not None else placement.destination
    if job is None and dst is None:
        if on_source:
            return placement.reason
        if view.unreachable is not None:
            return (
                f"{placement.reason}; libvirt shows it gone from {src}, and not every other "
                f"host's libvirtd could be asked ({view.unreachable})"
            )
        return f"{placement.reason}; libvirt shows it gone from {src}, and on no other host"
    succeeded = job is not None and job.state is JobState.SUCCEEDED
    if job is None:  # no record of a child anywhere (jobs/evacuation.py `find_children`)
        stopped = "never queued: the evacuation was stopped first"
        reason = stopped if ev.abort_requested else "no job of this evacuation found for it"
    elif succeeded:
        reason = f"job {job.id} succeeded"
    else:
        reason = f"job {job.id} {job.state.value}: {job.reason}"
    if on_source:
        return f"{reason} but libvirt shows it on {src}" if succeeded else reason
    if view.running_on is not None:
        return reason if job is not None else f"{reason}; libvirt shows it on {dst}"
    if view.unreachable is not None:
        there = f"{dst}'s libvirtd could not be asked ({view.unreachable})"
        return f"{reason}; libvirt shows it gone from {src}, and {there}"
    return f"{reason}; libvirt shows it neither here nor on {dst}"
