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

from config.events import get_logger
from config.settings import ConfigError
from jobs.evacuation import ACTIVE_EVACUATIONS, EvacuationSpec, EvacuationStore
from jobs.host_facts import HostFacts, read_facts
from jobs.keys import heartbeat_key, job_key
from jobs.maintenance import Maintenance
from jobs.record_read import KeyUnreadable, shared_key_read
from jobs.reservation_read import reserved_by_host
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
from worker.libvirt_states import migrating_in
from worker.local_disks import local_disk_paths
from worker.placement import Candidate, Guest
from worker.runtime import Runtime
from worker.tls_facts import TLS_REFUSAL

log = get_logger()
SHOWN_ID = 32  # a live set's member drover did not write is named by this much of it


@dataclass
class FleetView:
    guests: list[Guest]
    cpus: dict[str, GuestCpu]  # by uuid
    candidates: list[Candidate]
    unavailable: dict[str, str]  # host -> why it is not a candidate
    groups_unknown: str | None = None  # why groups on their way cannot be known (Heading)


def source_guests(rt: Runtime, include_inactive: bool) -> tuple[list[Guest], dict[str, GuestCpu]]:
    """The domains that must leave: every running one, and with `include_inactive` every
    defined-but-off one (moved by offline migration). A copy a migration is bringing in is
    not one (probe: planned as the host's own, its child refused, the evacuation said it was
    "neither here nor there" after its migration was aborted); if it lands, the evacuation's
    end finds it here (`appeared after planning`)."""
    guests, cpus = [], {}
    rates = dirty_rates_mib_s(rt.libvirt.conn)
    for dom in list_domains(rt.libvirt.conn):
        try:
            if migrating_in(dom):
                continue
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


@dataclass
class Heading:
    """Anti-affinity groups on their way to each host; `unknown`: why that cannot be known
    (the set of live evacuations is not a set), when it cannot."""

    groups: dict[str, Counter[str]]
    unknown: str | None = None


def groups_on_the_way(rt: Runtime, evacuation_id: str) -> Heading:
    """Anti-affinity groups already headed for each host: other evacuations' children not yet
    ended (or not yet queued), as their plans placed them.

    Each live evacuation on its own: one whose record cannot be read (a member of the set
    drover did not write) is skipped and said. A child whose state cannot be read counts as
    on its way (a limit kept, never ignored). A set that is not a set leaves every group
    unknown, said here; the planner then places no guest of a group (worker/evacuation_plan.py).
    """
    store = EvacuationStore(rt.store)
    heading: dict[str, Counter[str]] = {}
    try:
        others = store.active_ids()
    except KeyUnreadable as exc:
        why = f"{exc}: the anti-affinity groups on their way cannot be known"
        log.warning("record.unreadable", key=exc.key, reason=why)
        return Heading(heading, unknown=why)
    for other in others:
        if other == evacuation_id:
            continue
        try:
            ev = store.get(other)
        except JobNotFound as exc:  # MalformedRecord too: skipped, its plan unknown
            shown = other if len(other) <= SHOWN_ID else other[:SHOWN_ID] + "..."
            log.warning(
                "record.unreadable", key=ACTIVE_EVACUATIONS, field=shown, reason=str(exc)[:200]
            )
            continue
        for p in ev.plan or []:
            if p.group is None or p.destination is None:
                continue
            child = ev.children.get(p.domain)
            if child is not None and _ended(rt, child):
                continue
            heading.setdefault(p.destination, Counter())[p.group] += 1
    return Heading(heading)


def _ended(rt: Runtime, child: str) -> bool:
    """Whether the child has ended; not when its record cannot tell (fail safe)."""
    try:
        with shared_key_read(rt.store.r, job_key(child), "hash"):
            return rt.store.state(child) in TERMINAL
    except (JobNotFound, ValueError, KeyUnreadable):
        return False


def _alive(rt: Runtime, hosts: list[str]) -> set[str]:
    with rt.store.r.pipeline(transaction=False) as p:
        for host in hosts:
            p.exists(heartbeat_key(host))
        return {h for h, n in zip(hosts, p.execute(), strict=True) if n}


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
    alive = _alive(rt, list(limits))
    for name in limits:
        if name not in alive:
            unavailable[name] = "its worker is not alive"
    found = reserved_by_host(rt.store.r, [name for name in limits if name in alive])
    reserved = {name: mib for name, mib in found.items() if isinstance(mib, int)}
    unavailable.update({name: why for name, why in found.items() if isinstance(why, str)})
    asked = list(reserved)
    facts = read_facts(rt.store.r, asked, tunables.host_facts_ttl, tunables.host_facts_max_skew)
    # A host that says it has no migration TLS certificates takes no live guest of a --tls
    # drain (its shut-off guests move offline, without TLS).
    no_tls = {h for h, f in facts.items() if isinstance(f, HostFacts) and f.migration_tls is False}
    sigs = guest_signatures(cpus, host_cpus(rt.libvirt.conn, tunables.host_cpu_refresh))
    heading = groups_on_the_way(rt, evacuation_id)
    candidates, without_facts = candidates_from_facts(
        facts,
        sigs,
        reserved_mib=reserved,
        limits_mib=limits,
        heading=heading.groups,
    )
    unavailable.update(without_facts)
    if spec.tls:
        for c in candidates:
            c.tls_refusal = TLS_REFUSAL if c.name in no_tls else None
    return FleetView(guests, cpus, candidates, unavailable, heading.unknown)
