"""The lab's Linux guests as libvirt domains: the two kinds, their XML, define, start, wait.

`shared` (linux-N): its qcow2 disk lives in the lab's shared storage, seen by every host at the
same path, so a migration moves only memory. `local` (linux-local-N): its disk is in the
host's own /var/lib/libvirt/images (per host in the lab's mount namespaces), to be moved with
`--copy-storage all`. Both: direct kernel boot of lab/linux_guest.py's image, TCG, a virtio
NIC on the guest network (lab/guest_net.py) with a static address from the kernel command
line, the disk with cache='none' (what libvirt asks of a disk that is not copied).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt

from lab.guest_net import guest_address, guest_mac
from lab.layout import HOST_GUEST_BRIDGE, HostLayout, LabLayout
from lab.libvirtd import in_host
from lab.linux_guest import LinuxImage, make_disk
from lab.network import PREFIX_LEN
from lab.proc import run

LINUX_MEMORY_MIB = 192
SHARED = "shared"
LOCAL = "local"
# In the host's mount namespace: where drover's registry lets a storage copy make images.
LOCAL_IMAGES_DIR = "/var/lib/libvirt/images"


@dataclass(frozen=True)
class LinuxGuest:
    """One Linux guest of the lab: what status lists and probes use."""

    name: str
    kind: str  # SHARED or LOCAL
    address: str
    mac: str
    disk: str  # the path QEMU opens (inside the host's mount namespace for LOCAL)


def plan(lab: LabLayout, count: int, local: bool) -> list[LinuxGuest]:
    """`count` guests of one kind: names, addresses, MACs, disk paths."""
    guests = []
    for i in range(1, count + 1):
        name = f"linux-local-{i}" if local else f"linux-{i}"
        disk = (
            f"{LOCAL_IMAGES_DIR}/{name}.qcow2" if local else str(lab.shared_dir / f"{name}.qcow2")
        )
        guests.append(
            LinuxGuest(
                name=name,
                kind=LOCAL if local else SHARED,
                address=guest_address(lab, i, local),
                mac=guest_mac(lab, i, local),
                disk=disk,
            )
        )
    return guests


def local_path(guest: LinuxGuest, host: HostLayout) -> Path:
    """Where a local-disk guest's image on `host` is seen from the root namespace."""
    rel = Path(guest.disk).relative_to("/var/lib/libvirt")
    return host.own_dir("/var/lib/libvirt") / rel


def domain_xml(guest: LinuxGuest, image: LinuxImage) -> str:
    cmdline = f"console=ttyS0 panic=-1 quiet drover.ip={guest.address}/{PREFIX_LEN}"
    console = f"/var/log/libvirt/qemu/{guest.name}.console.log"
    return f"""<domain type='qemu'>
  <name>{escape(guest.name)}</name>
  <memory unit='MiB'>{LINUX_MEMORY_MIB}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{escape(guest.disk)}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='bridge'>
      <mac address='{guest.mac}'/>
      <source bridge='{HOST_GUEST_BRIDGE}'/>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>
    <serial type='file'>
      <source path='{escape(console)}' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def create(host: HostLayout, holder: int, guests: list[LinuxGuest], image: LinuxImage) -> None:
    """Make each guest's disk (where `host` sees it), define the guest there and start it.

    A shared disk is made in the root namespace, then copied in through the host's own
    mount of the shared storage (the root namespace does not mount it).
    """
    for g in guests:
        if g.kind == LOCAL:
            make_disk(local_path(g, host))
            continue
        staged = host.dir / f"{g.name}.staged.qcow2"
        make_disk(staged)
        run([*in_host(holder), "cp", str(staged), g.disk])
        staged.unlink()
    conn = libvirt.open(host.operator_uri)
    try:
        for g in guests:
            dom = conn.defineXML(domain_xml(g, image))
            if not dom.isActive():
                dom.create()
    finally:
        conn.close()
