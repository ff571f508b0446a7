"""A host's memory as libvirt reports it, and what drover may still place there.

Part of the libvirt seam (worker/libvirt_host.py): the destination's room check, the keeper's
report and the evacuation planner (from published facts) all count memory the same way.
"""

from __future__ import annotations

import libvirt

from worker.libvirt_host import KIB_PER_MIB, list_domains


def free_memory_mib(conn: libvirt.virConnect) -> int:
    """Free memory including page cache the kernel would give back (like MemAvailable)."""
    stats = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
    reclaimable = sum(int(stats.get(k, 0)) for k in ("free", "buffers", "cached"))
    return reclaimable // KIB_PER_MIB


def active_memory_mib(conn: libvirt.virConnect) -> int:
    """Memory of the domains running on a host: what it has already committed. A domain
    that goes between the listing and its own question (another job's rollback destroying
    its incoming copy) holds nothing any more: a probe saw an unrelated migration refused,
    "memory check could not be made: Domain not found", for it."""
    total_kib = 0
    for dom in list_domains(conn, active_only=True):
        try:
            total_kib += dom.maxMemory()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    return total_kib // KIB_PER_MIB


def room_mib(
    free_mib: int, active_mib: int, reserved_mib: int | None, limit_mib: int | None
) -> int:
    """Memory drover may still place on a host: free minus reservations, capped by the
    registry's declared limit (what is running there already counts against it). Pure, so
    the planner applies it to published facts (worker/facts_placement.py) the same way.

    Reservations and running guests only ever take room: a negative figure (a booking
    written into Redis by hand, jobs/reservation_read.py) counts as none, so the room never
    exceeds the limit, nor the free memory. Reservations that cannot be read at all (None:
    the host's key is not a hash, jobs/reservation_read.py) leave no room: nothing is placed
    on a host whose bookings are unknown."""
    if reserved_mib is None:
        return 0
    reserved, active = max(reserved_mib, 0), max(active_mib, 0)
    room = free_mib - reserved
    if limit_mib is not None:
        room = min(room, limit_mib - active - reserved)
    return max(room, 0)


def placement_room_mib(
    conn: libvirt.virConnect, reserved_mib: int | None, limit_mib: int | None
) -> int:
    """`room_mib` with this host's memory read from libvirt now."""
    active = active_memory_mib(conn) if limit_mib is not None else 0
    return room_mib(free_memory_mib(conn), active, reserved_mib, limit_mib)
