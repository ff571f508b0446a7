"""The CPU pre-check: can the destination's hypervisor run the guest's CPU, by libvirt.

The guest's CPU is read from the source libvirtd's live domain XML, where a running
host-model guest is already expanded to a named model with features. It is compared with
compareHypervisorCPU on the destination's own libvirtd, for the guest's virt type,
emulator, architecture and machine, with VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE so
that libvirt names the missing features. host-passthrough and maximum guests see their
host's very CPU: libvirt supports migrating them only between identical hosts, so the
source's and the destination's host CPUs (libvirt's domain capabilities, worker/host_probe.py)
must be the same, by the rule worker/cpu_compat.py applies to evacuation plans.
No override: libvirt offers none.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from jobs.host_facts import HostCpu
from worker.cpu_compat import CPU_REFUSAL, NAMED_FEATURES, cpu_refusal, guest_cpu_sig
from worker.host_probe import host_cpu
from worker.libvirt_host import Connection, LibvirtError, is_connection_error

PASSTHROUGH_MODES = frozenset({"host-passthrough", "maximum"})
_LIBVIRT_PREFIX = "the CPU is incompatible with host CPU: "


@dataclass(frozen=True)
class GuestCpuRequest:
    """What compareHypervisorCPU needs of the guest, from its domain XML."""

    virt_type: str
    arch: str | None
    machine: str | None
    emulator: str | None
    mode: str  # custom, host-model, host-passthrough, maximum; "none" without <cpu>
    cpu_xml: str | None  # the <cpu> element when it names a model


def cpu_request(domain_xml: str) -> GuestCpuRequest:
    """The guest's CPU as its (live) XML asks for it."""
    root = ET.fromstring(domain_xml)
    os_type = root.find("os/type")
    cpu = root.find("cpu")
    named = cpu is not None and cpu.find("model") is not None
    mode = "none" if cpu is None else cpu.get("mode") or ("custom" if named else "none")
    return GuestCpuRequest(
        virt_type=root.get("type", "kvm"),
        arch=os_type.get("arch") if os_type is not None else None,
        machine=os_type.get("machine") if os_type is not None else None,
        emulator=(root.findtext("devices/emulator") or "").strip() or None,
        mode=mode,
        cpu_xml=ET.tostring(cpu, encoding="unicode") if cpu is not None else None,
    )


def source_host_cpu(req: GuestCpuRequest, source: Connection) -> HostCpu | None:
    """The source's host CPU, read only for a guest that sees it (host-passthrough, maximum)."""
    return host_cpu(source, req.virt_type) if req.mode in PASSTHROUGH_MODES else None


def passthrough_refusal(req: GuestCpuRequest, src: HostCpu | None, here: Connection) -> str | None:
    """A host-passthrough/maximum guest: the destination's host CPU must be the source's."""
    dst = host_cpu(here, req.virt_type)
    sig = guest_cpu_sig(req.virt_type, req.cpu_xml, src.signature if src else None)
    return cpu_refusal(sig, dst)


def compare_refusal(req: GuestCpuRequest, here: Connection) -> str | None:
    """libvirt's own comparison on this host; its message names what is missing."""
    if req.cpu_xml is None or req.mode not in ("custom", "host-model"):
        return None
    if ET.fromstring(req.cpu_xml).find("model") is None:
        return None  # a host-model guest not running: expanded where it starts
    flags = libvirt.VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE
    try:
        here.compareHypervisorCPU(
            req.emulator, req.arch, req.machine, req.virt_type, req.cpu_xml, flags
        )
    except LibvirtError as exc:
        if is_connection_error(exc):
            raise  # the phase's retry on a fresh connection (worker/phase_frame.py)
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            return None  # a driver that cannot compare: the migration itself will tell
        if exc.get_error_code() == libvirt.VIR_ERR_CPU_INCOMPATIBLE:
            return f"{CPU_REFUSAL}: {shortened(exc.get_error_message())}"
        return f"CPU comparison failed: {exc.get_error_message()}"
    return None


def shortened(message: str) -> str:
    """libvirt's incompatibility message on one short line: its generic prefix dropped and
    at most NAMED_FEATURES features named (a model from another CPU generation lacks dozens)."""
    message = message.removeprefix(_LIBVIRT_PREFIX)
    head, sep, names = message.partition("features: ")
    if not sep:
        return message
    listed = [n.strip() for n in names.split(",") if n.strip()]
    more = " ..." if len(listed) > NAMED_FEATURES else ""
    return f"{head}features: {', '.join(listed[:NAMED_FEATURES])}{more}"


def cpu_check(
    req: GuestCpuRequest, source_cpu: HostCpu | None, here: Connection, host: str, domain: str
) -> str | None:
    """Why `host` (`here`, its libvirtd) cannot run the guest's CPU, or None; `source_cpu`
    is the source's host CPU (`source_host_cpu`), needed for passthrough guests only."""
    if req.mode in PASSTHROUGH_MODES:
        reason = passthrough_refusal(req, source_cpu, here)
        how = "the source's host CPU against this one"
    else:
        reason = compare_refusal(req, here)
        how = "libvirt's comparison"
    return f"{host} {reason} ({domain}, {how})" if reason else None
