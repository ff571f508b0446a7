"""A guest's CPU read from its domain XML, and the destination's own libvirt check of it.

The planner judges CPUs from published facts (worker/cpu_compat.py); the destination's
prepare asks its own libvirtd again (compareHypervisorCPU, what `virsh hypervisor-cpu-compare`
does) before anything is reserved or created, since facts may be stale or forged.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt

from worker.cpu_compat import CPU_REFUSAL, GuestCpu
from worker.libvirt_host import (
    Connection,
    Domain,
    LibvirtError,
    cpu_incompatible,
    is_connection_error,
)

# Modes whose <cpu> has no <model> and still asks something of the host.
_MODELLESS_MODES = {"host-passthrough", "maximum", "host-model"}


def guest_cpu(dom: Domain) -> GuestCpu:
    """The domain's virt type and <cpu> element (None when it asks for no particular CPU)."""
    root = ET.fromstring(dom.XMLDesc(0))
    cpu = root.find("cpu")
    named = cpu is not None and cpu.find("model") is not None
    wants = named or (cpu is not None and cpu.get("mode") in _MODELLESS_MODES)
    return GuestCpu(
        virt_type=root.get("type", "kvm"),
        cpu_xml=ET.tostring(cpu, encoding="unicode") if cpu is not None and wants else None,
    )


def libvirt_cpu_refusal(conn: Connection, cpu: GuestCpu) -> str | None:
    """Why the hypervisor of `conn` cannot run `cpu`, by libvirt's own comparison; None when
    it can, or when there is nothing libvirt can compare (no named model: host-passthrough,
    host-model and maximum are judged by libvirt when QEMU starts on the destination)."""
    if cpu.cpu_xml is None or ET.fromstring(cpu.cpu_xml).find("model") is None:
        return None
    try:
        incompatible = cpu_incompatible(conn, cpu.virt_type, cpu.cpu_xml)
    except LibvirtError as exc:
        if is_connection_error(exc):
            raise  # the phase's retry on a fresh connection (worker/phase_frame.py)
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            return None  # a driver that cannot compare: the migration itself will tell
        return f"CPU comparison failed: {exc.get_error_message()}"
    return CPU_REFUSAL if incompatible else None
