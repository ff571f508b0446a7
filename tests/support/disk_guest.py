"""A lab guest with a local disk: an empty qcow2 in one host's storage directory
(/var/lib/libvirt/images inside the host, the registry's `storage_dirs`), for --copy-storage."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import libvirt

from lab.guests import GuestSpec, domain_xml
from tests.support.lab_fixtures import Lab

IMAGES = "/var/lib/libvirt/images"  # inside every lab host (its own lib/images)
DISK_MIB = 64
MEMORY_MIB = 64


def host_images(lab: Lab, host: str) -> Path:
    """`host`'s /var/lib/libvirt/images as seen from the root namespace."""
    return Path(lab.status["config"]).parent / "hosts" / host / "lib" / "images"


def undefine(lab: Lab, host: str, name: str) -> None:
    """`name` gone from `host` (stopped and undefined), whatever state it was in."""
    conn = libvirt.open(lab.uri(host))
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefine()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


@contextmanager
def disk_guest(lab: Lab, name: str, host: str = "lab1") -> Iterator[str]:
    """`name` running on `host` with a 64 MiB qcow2 at IMAGES/<name>.qcow2; afterwards gone
    from every host, with every image of it (at any depth under the hosts' images)."""
    image = host_images(lab, host) / f"{name}.qcow2"
    image.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image), f"{DISK_MIB}M"], check=True
    )
    disk = (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{IMAGES}/{name}.qcow2'/><target dev='hda' bus='ide'/></disk>"
    )
    xml = domain_xml(GuestSpec(name, MEMORY_MIB)).replace("<devices>", f"<devices>{disk}", 1)
    conn = libvirt.open(lab.uri(host))
    try:
        conn.defineXML(xml).create()
    finally:
        conn.close()
    try:
        yield f"{IMAGES}/{name}.qcow2"
    finally:
        for each in lab.hosts():
            undefine(lab, each, name)
            for made in host_images(lab, each).rglob(f"{name}.qcow2"):
                made.unlink()
