"""`drover lab up --linux-guests N --local-linux-guests M`: the Linux guests' part of the lab.

The guest network across the hosts, the image (built once into a cache), the guests on lab1,
and up only when each guest's agent answers and its disk writer has written.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from lab import guest_net, linux_domain, shared_storage
from lab.guest_probe import wait_until_up
from lab.layout import HostLayout, LabLayout
from lab.linux_domain import LinuxGuest
from lab.linux_guest import build_image
from lab.proc import LabError

MAX_LINUX_GUESTS = guest_net.MAX_GUESTS


def check_counts(shared: int, local: int) -> None:
    for flag, n in (("--linux-guests", shared), ("--local-linux-guests", local)):
        if not 0 <= n <= MAX_LINUX_GUESTS:
            raise LabError(f"{flag} must be between 0 and {MAX_LINUX_GUESTS}")


def setup(
    lab: LabLayout, hosts: list[HostLayout], holders: list[int], shared: int, local: int
) -> list[LinuxGuest]:
    """Network, shared storage, image, disks and the running guests on the first host.

    `holders`: each host's namespace holder pid, in the order of `hosts`.
    """
    if shared + local == 0:
        return []
    guest_net.create_root_bridge(lab)
    for h in hosts:
        guest_net.create_host_segment(lab, h)
        # The serial console's file: libvirt makes this directory only when a guest starts.
        (h.own_dir("/var/log/libvirt") / "qemu").mkdir(parents=True, exist_ok=True)
    if shared:
        shared_storage.start(lab)
        for pid in holders:
            shared_storage.mount(lab, pid)
    image = build_image()
    guests = linux_domain.plan(lab, shared, local=False) + linux_domain.plan(lab, local, True)
    linux_domain.create(hosts[0], holders[0], guests, image)
    for g in guests:
        wait_until_up(g.address)
    return guests


def status_entries(guests: list[LinuxGuest]) -> list[dict[str, Any]]:
    """What `drover lab status --json` shows of each Linux guest."""
    return [asdict(g) for g in guests]
