"""A host's memory as libvirt reports it, and what drover may still place there.

Part of the libvirt seam (worker/libvirt_host.py): the destination's room check, the keeper's
report and the evacuation planner all count memory the same way.
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
    """Memory of the domains running on a host: what it has already committed."""
    return sum(d.maxMemory() // KIB_PER_MIB for d in list_domains(conn, active_only=True))


def placement_room_mib(conn: libvirt.virConnect, reserved_mib: int, limit_mib: int | None) -> int:
    """Memory drover may still place on a host: free minus reservations, capped by the
    registry's declared limit (what is running there already counts against it)."""
    room = free_memory_mib(conn) - reserved_mib
    if limit_mib is not None:
        room = min(room, limit_mib - active_memory_mib(conn) - reserved_mib)
    return max(room, 0)
