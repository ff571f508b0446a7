"""What an evacuation's planner needs to know: the source's guests from its own libvirtd,
every candidate destination from the facts its worker published in Redis.

No libvirt connection is opened to a candidate: its free memory, the anti-affinity groups
running there and its hypervisor's CPU come from its `HostFacts` record (jobs/host_facts.py,
published every report tick with a time to live); a host whose record is missing, expired
or invalid is unavailable, with that reason in the plan. CPUs are judged from the facts once
per (guest CPU, host CPU) pair (worker/cpu_compat.py). Reservations, maintenance and
liveness come from Redis, read fresh. The planner does not wait for facts: a worker
publishes its first record as it starts, so a host without one has no worker that could
take the guest anyway. What the facts say is checked again by the destination's prepare
against its own libvirtd (worker/phase_destination.py): libvirt has the last word.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from config.settings import ConfigError
from jobs.evacuation import EvacuationSpec, EvacuationStore
from jobs.host_facts import HostFacts, liveness_and_reservations, read_facts
from jobs.maintenance import Maintenance
from jobs.states import TERMINAL
from jobs.store import JobNotFound
from worker.cpu_compat import GuestCpu as GuestCpu
from worker.domain_metadata import PLACEMENT_NS as PLACEMENT_NS
from worker.domain_metadata import anti_affinity_group, policy_name
from worker.facts_placement import candidates_from_facts, guest_signatures
from worker.guest_cpu import guest_cpu
from worker.host_probe import host_cpus
from worker.libvirt_host import (
    KIB_PER_MIB,
    Domain,
    LibvirtError,
    dirty_rates_mib_s,
    is_gone,
    list_domains,
)
from worker.local_disks import local_disk_paths
from worker.placement import Candidate, Guest
from worker.runtime import Runtime
from worker.tls_facts import TLS_REFUSAL


@dataclass
class FleetView:
    guests: list[Guest]
    cpus: dict[str, GuestCpu]  # by uuid
    candidates: list[Candidate]
    unavailable: dict[str, str]  # host -> why it is not a candidate


def source_guests(rt: Runtime, include_inactive: bool) -> tuple[list[Guest], dict[str, GuestCpu]]:
    """The domains that must leave: every running one, and with `include_inactive` every
    defined-but-off one (moved by offline migration)."""
    guests, cpus = [], {}
    rates = dirty_rates_mib_s(rt.libvirt.conn)
    for dom in list_domains(rt.libvirt.conn):
        try:
            guest = _guest(dom, include_inactive, rates)
            cpu = guest_cpu(dom) if guest is not None else None
        except LibvirtError as exc:
            if not is_gone(exc):
                raise
            continue  # it left between the listing and the look (a migration that just ended)
        if guest is not None and cpu is not None:
            guests.append(guest)
            cpus[guest.uuid] = cpu
    return guests, cpus


def _guest(dom: Domain, include_inactive: bool, rates: dict[str, float]) -> Guest | None:
    active, persistent = bool(dom.isActive()), bool(dom.isPersistent())
    if not active and not (include_inactive and persistent):
        return None
    return Guest(
        domain=dom.name(),
        uuid=dom.UUIDString(),
        memory_mib=dom.maxMemory() // KIB_PER_MIB,
        active=active,
        persistent=persistent,
        group=anti_affinity_group(dom),
        policy=policy_name(dom),
        dirty_mib_s=rates.get(dom.UUIDString()),
        local_disks=len(local_disk_paths(dom.XMLDesc(0))),
    )


def groups_on_the_way(rt: Runtime, evacuation_id: str) -> dict[str, Counter[str]]:
    """Anti-affinity groups already headed for each host: other evacuations' children not yet
    ended (or not yet queued), as their plans placed them."""
    store = EvacuationStore(rt.store)
    heading: dict[str, Counter[str]] = {}
    for other in store.active_ids():
        if other == evacuation_id:
            continue
        try:
            ev = store.get(other)
        except JobNotFound:
            continue
        for p in ev.plan or []:
            if p.group is None or p.destination is None:
                continue
            child = ev.children.get(p.domain)
            if child is not None and rt.store.state(child) in TERMINAL:
                continue
            heading.setdefault(p.destination, Counter())[p.group] += 1
    return heading


def gather(rt: Runtime, spec: EvacuationSpec, evacuation_id: str) -> FleetView:
    guests, cpus = source_guests(rt, spec.include_inactive)
    tunables = rt.settings.tunables
    disabled = Maintenance(rt.store.r).disabled()
    unavailable: dict[str, str] = {}
    limits: dict[str, int | None] = {}
    for name in spec.to or sorted(rt.settings.hosts):
        if name == spec.host:
            continue
        if name in disabled:
            unavailable[name] = f"in maintenance ({disabled[name].reason})"
            continue
        try:
            limits[name] = rt.settings.host(name).limits.memory_mib
        except ConfigError as exc:  # named in --to, removed from the registry since
            unavailable[name] = str(exc)
    alive, reserved = liveness_and_reservations(rt.store.r, list(limits))
    for name in limits:
        if name not in alive:
            unavailable[name] = "its worker is not alive"
    asked = [name for name in limits if name in alive]
    facts = read_facts(rt.store.r, asked, tunables.host_facts_ttl, tunables.host_facts_max_skew)
    if spec.tls:  # a host that says it has no migration TLS certificates cannot take one
        facts = {
            h: TLS_REFUSAL if isinstance(f, HostFacts) and f.migration_tls is False else f
            for h, f in facts.items()
        }
    sigs = guest_signatures(cpus, host_cpus(rt.libvirt.conn, tunables.host_cpu_refresh))
    candidates, without_facts = candidates_from_facts(
        facts,
        sigs,
        reserved_mib=reserved,
        limits_mib=limits,
        heading=groups_on_the_way(rt, evacuation_id),
    )
    unavailable.update(without_facts)
    return FleetView(guests, cpus, candidates, unavailable)
