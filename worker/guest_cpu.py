"""A guest's CPU read from its domain XML, for the planner's rules (worker/cpu_compat.py).

The destination's prepare asks its own libvirtd again (worker/precheck_cpu.py,
compareHypervisorCPU) before anything is reserved or created, since facts may be stale.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from worker.cpu_compat import GuestCpu
from worker.libvirt_host import (
    Domain,
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
