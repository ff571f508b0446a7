"""The lab's guests: what they look like and how they are defined and started on a host.

Both run under TCG (`type='qemu'`): a `kvm` guest never executes here. `idle-1` has no OS and
migrates in about two seconds; `dirty-1` runs a tiny kernel that rewrites 64 MiB of RAM all
the time, the guest that makes bandwidth caps, convergence and abort matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt

IDLE_MEMORY_MIB = 64
DIRTY_MEMORY_MIB = 128


@dataclass(frozen=True)
class GuestSpec:
    name: str
    memory_mib: int
    kernel: Path | None = None


def domain_xml(spec: GuestSpec) -> str:
    kernel = f"<kernel>{escape(str(spec.kernel))}</kernel>" if spec.kernel else ""
    return f"""<domain type='qemu'>
  <name>{escape(spec.name)}</name>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>{kernel}</os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def default_guests(kernel: Path, idle: int = 1) -> list[GuestSpec]:
    """`idle` idle guests (idle-1..idle-N, enough to drain a host) and the one dirty guest."""
    return [GuestSpec(f"idle-{i}", IDLE_MEMORY_MIB) for i in range(1, idle + 1)] + [
        GuestSpec("dirty-1", DIRTY_MEMORY_MIB, kernel=kernel)
    ]


def define_and_start(uri: str, guests: list[GuestSpec]) -> None:
    """Define each guest persistently on the host at `uri` and start it."""
    conn = libvirt.open(uri)
    try:
        for spec in guests:
            dom = conn.defineXML(domain_xml(spec))
            if not dom.isActive():
                dom.create()
    finally:
        conn.close()
