"""What an evacuation's planner needs to know, read from libvirt on every host involved.

The source's own domains come from its libvirtd; each candidate destination is asked over its
registry `peer_uri` for free memory, the anti-affinity groups already running there, and
whether its hypervisor can run each guest's CPU (libvirt's compareHypervisorCPU, the check
virsh's `hypervisor-cpu-compare` makes). Reservations and maintenance come from Redis.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass

from config.settings import ConfigError
from jobs.evacuation import EvacuationSpec, EvacuationStore
from jobs.maintenance import Maintenance
from jobs.states import TERMINAL
from jobs.store import JobNotFound
from worker.domain_metadata import PLACEMENT_NS as PLACEMENT_NS
from worker.domain_metadata import anti_affinity_group, policy_name
from worker.host_memory import placement_room_mib
from worker.libvirt_host import (
    KIB_PER_MIB,
    Connection,
    Domain,
    LibvirtError,
    cpu_incompatible,
    dirty_rates_mib_s,
    is_gone,
    list_domains,
)
from worker.placement import Candidate, Guest
from worker.runtime import Runtime


@dataclass(frozen=True)
class GuestCpu:
    virt_type: str
    cpu_xml: str | None  # None: the domain asks for no particular CPU


@dataclass
class FleetView:
    guests: list[Guest]
    cpus: dict[str, GuestCpu]  # by uuid
    candidates: list[Candidate]
    unavailable: dict[str, str]  # host -> why it is not a candidate


def _cpu(dom: Domain) -> GuestCpu:
    root = ET.fromstring(dom.XMLDesc(0))
    cpu = root.find("cpu")
    has_model = cpu is not None and cpu.find("model") is not None
    return GuestCpu(
        virt_type=root.get("type", "kvm"),
        cpu_xml=ET.tostring(cpu, encoding="unicode") if cpu is not None and has_model else None,
    )


def source_guests(rt: Runtime, include_inactive: bool) -> tuple[list[Guest], dict[str, GuestCpu]]:
    """The domains that must leave: every running one, and with `include_inactive` every
    defined-but-off one (moved by offline migration)."""
    guests, cpus = [], {}
    rates = dirty_rates_mib_s(rt.libvirt.conn)
    for dom in list_domains(rt.libvirt.conn):
        try:
            guest = _guest(dom, include_inactive, rates)
            cpu = _cpu(dom) if guest is not None else None
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
    )


def _candidate(rt: Runtime, name: str, conn: Connection, cpus: dict[str, GuestCpu]) -> Candidate:
    reserved = rt.store.reserved_mib(name)
    limit = rt.settings.host(name).limits.memory_mib
    groups: Counter[str] = Counter()
    for dom in list_domains(conn, active_only=True):
        group = anti_affinity_group(dom)
        if group is not None:
            groups[group] += 1
    refusals = {}
    for uuid, cpu in cpus.items():
        if cpu.cpu_xml is None:
            continue
        try:
            incompatible = cpu_incompatible(conn, cpu.virt_type, cpu.cpu_xml)
        except LibvirtError as exc:
            refusals[uuid] = f"CPU comparison failed: {exc.get_error_message()}"
            continue
        if incompatible:
            refusals[uuid] = "cannot run the guest's CPU model"
    return Candidate(
        name=name,
        free_mib=placement_room_mib(conn, reserved, limit),
        groups=groups,
        cpu_refusals=refusals,
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
    disabled = Maintenance(rt.store.r).disabled()
    heading = groups_on_the_way(rt, evacuation_id)
    names = spec.to or sorted(rt.settings.hosts)
    candidates, unavailable = [], {}
    for name in names:
        if name == spec.host:
            continue
        if name in disabled:
            unavailable[name] = f"in maintenance ({disabled[name].reason})"
            continue
        if not rt.store.alive(name):
            unavailable[name] = "its worker is not alive"
            continue
        try:
            conn = rt.libvirt.open_peer(rt.settings.host(name).peer_uri)
        except ConfigError as exc:  # named in --to, removed from the registry since
            unavailable[name] = str(exc)
            continue
        except LibvirtError as exc:
            unavailable[name] = f"libvirtd unreachable: {exc.get_error_message()}"
            continue
        try:
            candidate = _candidate(rt, name, conn, cpus)
            candidate.groups.update(heading.get(name, Counter()))
            candidates.append(candidate)
        except LibvirtError as exc:
            unavailable[name] = f"libvirtd error: {exc.get_error_message()}"
        finally:
            with contextlib.suppress(LibvirtError):
                conn.close()
    return FleetView(guests, cpus, candidates, unavailable)
