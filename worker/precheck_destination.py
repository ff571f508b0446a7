"""The destination's pre-checks, run in destination_prepare on what the source's libvirtd
shows of the guest (its live XML, its disks' sizes) against this host's own view:

    cpu           libvirt's CPU comparison on this libvirtd (worker/precheck_cpu.py)
    anti_affinity no domain of the guest's anti-affinity group runs on this libvirtd
    hugepages     free hugepages of the guest's page size here (worker/precheck_memory.py)
    shared_disks  every disk not copied is here at the same path, same kind and size
    storage_room  with --copy-storage, room for the full capacity of every image made here
    memory        room for the guest's memory (libvirt's free memory, the declared limit)
    tls           with --tls, QEMU's migration server certificates here (worker/tls_facts.py)
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.host_facts import HostCpu
from jobs.spec import MigrationSpec
from worker.domain_metadata import anti_affinity_group, running_in_group
from worker.guest_disks import copied, guest_disks
from worker.libvirt_host import Connection, Domain, LibvirtError
from worker.precheck import Check
from worker.precheck_cpu import GuestCpuRequest, cpu_check, cpu_request, source_host_cpu
from worker.precheck_memory import hugepage_refusals
from worker.precheck_storage import room_refusal, unseen_refusal
from worker.storage import StorageError, confined
from worker.storage_view import path_view, rooms
from worker.tls_facts import tls_refusal


@dataclass(frozen=True)
class SourceGuest:
    """The guest as the source's libvirtd shows it, for the destination's checks."""

    xml: str  # its live domain XML
    cpu: GuestCpuRequest
    source_cpu: HostCpu | None  # the source's host CPU (passthrough guests only)
    capacities: dict[str, int]  # path -> virtual size (blockInfo), each disk with a source
    uuid: str
    group: str | None  # its anti-affinity group, its own metadata on the source


def read_source_guest(dom: Domain) -> SourceGuest:
    """Read through the source's libvirtd connection (`dom` is the guest there)."""
    xml = dom.XMLDesc(0)
    req = cpu_request(xml)
    sizes = {}
    for disk in guest_disks(xml):
        try:
            sizes[disk.path] = int(dom.blockInfo(disk.path)[0])
        except LibvirtError:  # no size from libvirt: compared by path and kind only
            continue
    cpu = source_host_cpu(req, dom.connect())
    return SourceGuest(xml, req, cpu, sizes, dom.UUIDString(), anti_affinity_group(dom))


def anti_affinity_refusal(guest: SourceGuest, conn: Connection, host: str) -> str | None:
    """The guest's own declared rule, judged on this host's libvirtd: the planner chose this
    host from its published facts, which anyone with the Redis password can rewrite, and a
    plain migration never consulted them. Running domains only, as the planner counts."""
    if guest.group is None:
        return None
    there = running_in_group(conn, guest.group, guest.uuid)
    if not there:
        return None
    return f"{host}: anti-affinity group {guest.group} already there ({', '.join(there)} running)"


def shared_disks_refusal(spec: MigrationSpec, guest: SourceGuest, host: str) -> str | None:
    """Disks not copied must be this host's at the same path (the kind and size agreeing)."""
    copy = spec.copy_storage is not None
    reasons = [
        reason
        for disk in guest_disks(guest.xml)
        if not copied(disk, copy, spec.migrate_disks)
        for reason in [unseen_refusal(disk, guest.capacities.get(disk.path), path_view(disk), host)]
        if reason
    ]
    return "; ".join(reasons) or None


def storage_room_refusal(
    spec: MigrationSpec, guest: SourceGuest, dirs: list[str], host: str
) -> str | None:
    """Room for the full capacity of every image this host would make (worker/storage.py)."""
    targets = []
    for disk in guest_disks(guest.xml):
        if disk.kind == "file" and disk.device == "disk" and copied(disk, True, spec.migrate_disks):
            try:
                path = str(confined(disk.path, dirs))
            except StorageError as exc:
                return f"{host}: {exc}"
            targets.append((path, guest.capacities.get(disk.path, 0)))
    return room_refusal(rooms(targets), host)


def destination_checks(
    spec: MigrationSpec,
    guest: SourceGuest,
    conn: Connection,
    host: str,
    storage_dirs: list[str],
) -> list[Check]:
    """The checks for bringing the guest here (memory is added by the phase: it knows the
    reservations)."""
    checks: list[Check] = [
        ("cpu", lambda: cpu_check(guest.cpu, guest.source_cpu, conn, host, spec.domain)),
        ("anti_affinity", lambda: anti_affinity_refusal(guest, conn, host)),
    ]
    if spec.offline:
        return checks
    if spec.tls:
        checks.append(("tls", lambda: tls_refusal(host, destination=True)))
    checks.append(("hugepages", lambda: hugepage_refusals(conn, guest.xml, host)))
    checks.append(("shared_disks", lambda: shared_disks_refusal(spec, guest, host)))
    if spec.copy_storage is not None:
        checks.append(
            ("storage_room", lambda: storage_room_refusal(spec, guest, storage_dirs, host))
        )
    return checks
