"""This host's facts, read from its own libvirtd for the report duty (jobs/host_facts.py).

Memory and running domains are read every report; the hypervisor's CPU (libvirt's domain
capabilities per virt type, the host-model CPU's features expanded by libvirt's baseline
call) changes only with a new libvirtd or QEMU, so it is read again every
`tunables.host_cpu_refresh` or when the connection is a new one.
"""

from __future__ import annotations

import re
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from jobs.host_facts import CPU_NAME_PATTERN, HostCpu, HostFacts, RunningDomain
from jobs.store import now
from worker.domain_metadata import anti_affinity_group
from worker.host_memory import free_memory_mib
from worker.libvirt_host import KIB_PER_MIB, Connection, LibvirtError, is_gone, list_domains
from worker.tls_facts import migration_tls_ready

# The virt types a guest of drover's fleets asks for; a hypervisor lacking one says so
# (libvirt refuses its domain capabilities) and it is left out of the facts.
VIRT_TYPES = ("kvm", "qemu")
_REQUIRING = {"require", None}
# A name the facts' model would refuse is left out (a guest can then not be matched to it, a
# refusal on the safe side) rather than failing the whole record.
_NAME = re.compile(CPU_NAME_PATTERN)
_CONNECTION_ERRORS = (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT)


def _expanded_features(conn: Connection, arch: str, virt_type: str, mode: ET.Element) -> set[str]:
    """Every feature of the host-model CPU, its model's own included (libvirt lists only
    those beyond the model; expanding makes a guest's required feature easy to look up)."""
    cpu = ET.Element("cpu", mode="custom", match="exact")
    cpu.extend(list(mode))
    expanded = conn.baselineHypervisorCPU(
        None,
        arch,
        None,
        virt_type,
        [ET.tostring(cpu, encoding="unicode")],
        libvirt.VIR_CONNECT_BASELINE_CPU_EXPAND_FEATURES,
    )
    return {
        f.get("name") or ""
        for f in ET.fromstring(expanded).findall("feature")
        if f.get("policy") in _REQUIRING
    }


def host_cpu(conn: Connection, virt_type: str) -> HostCpu | None:
    """What the hypervisor offers guests of `virt_type`; None when it offers no such guests
    (or libvirt cannot describe them: the planner then places none of that type here)."""
    try:
        return _host_cpu(conn, virt_type)
    except LibvirtError as exc:
        if exc.get_error_code() in _CONNECTION_ERRORS:
            raise
        return None  # not offered here, or the driver has no capabilities to read


def _host_cpu(conn: Connection, virt_type: str) -> HostCpu:
    caps = ET.fromstring(conn.getDomainCapabilities(None, None, None, virt_type, 0))
    arch = caps.findtext("arch") or "unknown"
    modes = {m.get("name"): m for m in caps.findall("cpu/mode")}

    def supported(name: str) -> bool:
        return name in modes and modes[name].get("supported") == "yes"

    model = vendor = None
    features: set[str] = set()
    if supported("host-model"):
        host_model = modes["host-model"]
        model = (host_model.findtext("model") or "").strip() or None
        vendor = (host_model.findtext("vendor") or "").strip() or None
        features = _expanded_features(conn, arch, virt_type, host_model)
    usable = set()
    if supported("custom"):
        for m in modes["custom"].findall("model"):
            if m.get("usable") == "yes" and m.text:
                usable.add(m.text.strip())
    return HostCpu(
        virt_type=virt_type,
        arch=arch,
        vendor=vendor if vendor and _NAME.match(vendor) else None,
        model=model if model and _NAME.match(model) else None,
        features=frozenset(f for f in features if _NAME.match(f)),
        usable_models=frozenset(m for m in usable if _NAME.match(m)),
        host_model=supported("host-model"),
        host_passthrough=supported("host-passthrough"),
        maximum=supported("maximum"),
    )


@dataclass
class _CpuCache:
    conn_id: int = 0
    read_at: float = 0.0
    cpus: tuple[HostCpu, ...] = ()


_cache = _CpuCache()
_cache_lock = threading.Lock()


def host_cpus(conn: Connection, refresh_s: float) -> list[HostCpu]:
    """The hypervisor's CPUs per virt type, read at most every `refresh_s` per connection."""
    with _cache_lock:
        fresh = time.monotonic() - _cache.read_at < refresh_s
        if _cache.conn_id == id(conn) and fresh and _cache.cpus:
            return list(_cache.cpus)
    cpus = tuple(c for c in (host_cpu(conn, vt) for vt in VIRT_TYPES) if c is not None)
    with _cache_lock:
        _cache.conn_id, _cache.read_at, _cache.cpus = id(conn), time.monotonic(), cpus
    return list(cpus)


def running_domains(conn: Connection) -> list[RunningDomain]:
    running = []
    for dom in list_domains(conn, active_only=True):
        try:
            running.append(
                RunningDomain(
                    name=dom.name(),
                    memory_mib=dom.maxMemory() // KIB_PER_MIB,
                    group=anti_affinity_group(dom),
                )
            )
        except LibvirtError as exc:
            if not is_gone(exc):
                raise  # else it left between the listing and the look
    return running


def collect_facts(conn: Connection, host: str, worker: str, cpu_refresh_s: float) -> HostFacts:
    """This host's facts through its own libvirtd, now."""
    domains = running_domains(conn)
    return HostFacts(
        host=host,
        worker=worker,
        ts=now(),
        free_mib=free_memory_mib(conn),
        active_mib=sum(d.memory_mib for d in domains),
        cpus=host_cpus(conn, cpu_refresh_s),
        domains=domains,
        migration_tls=migration_tls_ready(),
    )
