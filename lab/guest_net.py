"""The guests' network: one L2 segment across the lab hosts, reachable from the root namespace.

Each host namespace has a bridge of the same name (HOST_GUEST_BRIDGE) that guests' virtio NICs
join (`<interface type='bridge'>`), so a domain's XML is the same on every host; a veth joins
it to one bridge in the root namespace that holds the segment's root address. After a
migration QEMU's announce (and the guest's own gratuitous ARP) teaches the bridges the
guest's new port, so root keeps reaching the guest on its new host.
"""

from __future__ import annotations

from pathlib import Path

from lab.layout import HOST_GUEST_BRIDGE, HostLayout, LabLayout
from lab.network import PREFIX_LEN
from lab.proc import run

# Guest addresses: linux-N at .10+N, the local-disk kind at .100+N.
SHARED_GUEST_OCTET = 10
LOCAL_GUEST_OCTET = 100
MAX_GUESTS = 8


def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def create_root_bridge(lab: LabLayout) -> None:
    if not _link_exists(lab.guest_bridge):
        run(["ip", "link", "add", lab.guest_bridge, "type", "bridge"])
    addr = f"{lab.guest_root_address}/{PREFIX_LEN}"
    run(["ip", "addr", "replace", addr, "dev", lab.guest_bridge])
    run(["ip", "link", "set", lab.guest_bridge, "up"])


def create_host_segment(lab: LabLayout, host: HostLayout) -> None:
    """The host's guest bridge, joined by veth to the root namespace's guest bridge."""
    ns = ["ip", "-n", host.netns]
    run([*ns, "link", "add", HOST_GUEST_BRIDGE, "type", "bridge"], check=False)
    if not _link_exists(host.veth_guest_root):
        run(
            [
                *("ip", "link", "add", host.veth_guest_root, "type", "veth"),
                *("peer", "name", host.veth_guest_host, "netns", host.netns),
            ]
        )
    run(["ip", "link", "set", host.veth_guest_root, "master", lab.guest_bridge])
    run(["ip", "link", "set", host.veth_guest_root, "up"])
    run([*ns, "link", "set", host.veth_guest_host, "master", HOST_GUEST_BRIDGE])
    run([*ns, "link", "set", host.veth_guest_host, "up"])
    run([*ns, "link", "set", HOST_GUEST_BRIDGE, "up"])


def guest_address(lab: LabLayout, index: int, local: bool) -> str:
    base = LOCAL_GUEST_OCTET if local else SHARED_GUEST_OCTET
    return f"{lab.guest_subnet}.{base + index}"


def guest_mac(lab: LabLayout, index: int, local: bool) -> str:
    """A locally administered MAC (QEMU's 52:54:00 prefix) unique in the lab."""
    last = (LOCAL_GUEST_OCTET if local else SHARED_GUEST_OCTET) + index
    return f"52:54:00:d7:{lab.lab_id:02x}:{last:02x}"
