"""Lifting a post-copy's bandwidth cap from the outside, as an operator hastening it would.

The post-copy fault cases hold post-copy open at 1 MiB/s so a fault lands mid-way; once the
fault is over the test lifts the cap so the case ends soon. libvirt takes the new cap only
while its own migration job is on the guest; after a link cut the migration can go on in
QEMU by itself (the TCP stream survives the cut) with libvirt's job gone, and then the cap is
lifted in QEMU directly (QMP `migrate-set-parameters`), or the rest of the guest's memory
crawls at 1 MiB/s for minutes.
"""

from __future__ import annotations

import json

import libvirt
import libvirt_qemu

MIB = 1024 * 1024


def lift_postcopy_cap(uri: str, domain: str, mib: int) -> bool:
    """Raise the post-copy cap of `domain`'s outgoing migration on the host at `uri` to
    `mib` MiB/s; True once libvirt or QEMU took it, or once the guest is not active there (no
    post-copy left to speed up); False while it is not paused for a migration."""
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(domain)
        if not dom.isActive():
            return True
        if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
            return False
        try:
            dom.migrateSetMaxSpeed(mib, libvirt.VIR_DOMAIN_MIGRATE_MAX_SPEED_POSTCOPY)
            return True
        except libvirt.libvirtError:
            pass  # no libvirt job on it: ask QEMU
        command = {
            "execute": "migrate-set-parameters",
            "arguments": {"max-postcopy-bandwidth": mib * MIB},
        }
        libvirt_qemu.qemuMonitorCommand(dom, json.dumps(command), 0)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()
