"""Whether a destination can run a guest's CPU, decided from published host facts.

The planner used to ask each candidate's libvirtd (compareHypervisorCPU, once per guest per
host). libvirt has no call that compares a CPU against *another* host's description:
compareHypervisorCPU and compareCPU both judge against the hypervisor of the connection they
are called on, and baselineHypervisorCPU computes a common CPU, not a verdict. So the
decision is made here, from each host's published `HostCpu` (jobs/host_facts.py, read by
its worker from libvirt's domain capabilities, host-model features expanded by libvirt),
with these rules, per the guest's `<cpu mode=...>`:

- no `<cpu>` model at all (and not host-passthrough/maximum): any host running that virt
  type will do, as libvirt's comparison would say;
- custom (this is also what a running host-model guest's live XML shows: libvirt expands
  it to a named model plus features): the model must be one QEMU marks usable on the
  destination, a vendor the guest names must be the destination's, every feature the guest
  requires (policy `require`, or no policy) must be in the destination's expanded host-model
  features, and no feature it forbids may be there. `force`, `optional` and `disable` ask
  nothing of the host;
- host-model (a defined-but-off guest: it will be expanded where it starts): the mode must
  be supported on the destination;
- host-passthrough and maximum: the guest sees its host's very CPU, which libvirt supports
  migrating only between identical hosts, so the destination's CPU signature must equal the
  source's (and the mode be supported there).

The rules err towards refusing: a host they turn down that libvirt would have accepted is a
guest left in place with a reason, the other way round a migration that fails in prepare.
Verdicts depend only on (guest CPU signature, host CPU signature), so each pair is decided
once per process and cached: a 1,000-guest drain has a handful of distinct guest CPUs and
host CPU models. The destination's prepare still asks its own libvirtd
(worker/precheck_cpu.py); facts may be stale, libvirt has the last word.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache

from jobs.host_facts import HostCpu

CPU_REFUSAL = "cannot run the guest's CPU model"
# Distinct guest CPU definitions and (guest, host) verdicts remembered per process; a fleet
# has tens of each. Past the bound the verdict cache starts over (cheap to recompute).
PARSE_CACHE_SIZE = 4096
VERDICT_CACHE_SIZE = 65_536
NAMED_FEATURES = 5  # features a refusal names (the rest as "...")
_REQUIRING = {"require", None}
_PASSTHROUGH = {"host-passthrough", "maximum"}


@dataclass(frozen=True)
class GuestCpu:
    """A guest's CPU as its domain XML asks for it (worker/guest_cpu.py reads it)."""

    virt_type: str
    cpu_xml: str | None  # its <cpu> element; None: the domain asks for no particular CPU


@dataclass(frozen=True)
class GuestCpuSig:
    """What the rules read of a guest's `<cpu>`: hashable, the first half of a cache key."""

    virt_type: str
    mode: str  # custom, host-model, host-passthrough, maximum; "none" without a CPU model
    model: str | None = None
    vendor: str | None = None
    required: frozenset[str] = frozenset()
    forbidden: frozenset[str] = frozenset()
    source: str | None = None  # host-passthrough/maximum: the source host CPU's signature


@lru_cache(maxsize=PARSE_CACHE_SIZE)
def guest_cpu_sig(virt_type: str, cpu_xml: str | None, source: str | None) -> GuestCpuSig:
    """The signature of a guest's `<cpu>` element (`cpu_xml`, None: it has none); `source`
    is the source host's CPU signature for this virt type, kept for host-passthrough only."""
    if cpu_xml is None:
        return GuestCpuSig(virt_type, "none")
    cpu = ET.fromstring(cpu_xml)
    model = cpu.findtext("model")
    mode = cpu.get("mode") or ("custom" if model else "none")
    if mode in _PASSTHROUGH:
        return GuestCpuSig(virt_type, mode, source=source)
    if mode == "custom" and not model:
        return GuestCpuSig(virt_type, "none")
    features = [(f.get("policy"), f.get("name") or "") for f in cpu.findall("feature")]
    return GuestCpuSig(
        virt_type,
        mode,
        model=model.strip() if model else None,
        vendor=(cpu.findtext("vendor") or "").strip() or None,
        required=frozenset(name for policy, name in features if policy in _REQUIRING),
        forbidden=frozenset(name for policy, name in features if policy == "forbid"),
    )


def _decide(guest: GuestCpuSig, host: HostCpu | None) -> str | None:
    if guest.mode == "none":
        return None if host is not None else f"its hypervisor offers no {guest.virt_type} guests"
    if host is None:
        return f"{CPU_REFUSAL}: its hypervisor offers no {guest.virt_type} guests"
    if guest.mode in _PASSTHROUGH:
        offered = host.maximum if guest.mode == "maximum" else host.host_passthrough
        if not offered:
            return f"{CPU_REFUSAL}: {guest.mode} is not supported there"
        if guest.source is None or guest.source != host.signature:
            return f"{CPU_REFUSAL}: {guest.mode} needs a host CPU identical to the source's"
        return None
    if guest.mode == "host-model":
        return None if host.host_model else f"{CPU_REFUSAL}: host-model is not supported there"
    if guest.model not in host.usable_models:
        return f"{CPU_REFUSAL}: {guest.model} is not usable on its {guest.virt_type} hypervisor"
    if guest.vendor is not None and guest.vendor != host.vendor:
        return f"{CPU_REFUSAL}: vendor {guest.vendor}, the host's is {host.vendor}"
    missing = sorted(guest.required - host.features)
    if missing:
        more = " ..." if len(missing) > NAMED_FEATURES else ""
        return f"{CPU_REFUSAL}: lacks {', '.join(missing[:NAMED_FEATURES])}{more}"
    present = sorted(guest.forbidden & host.features)
    if present:
        return f"{CPU_REFUSAL}: has forbidden {', '.join(present[:NAMED_FEATURES])}"
    return None


_verdicts: dict[tuple[GuestCpuSig, str | None], str | None] = {}


def cpu_refusal(guest: GuestCpuSig, host: HostCpu | None) -> str | None:
    """Why a host with `host` (None: no CPU facts for the guest's virt type) cannot run the
    guest's CPU, or None; decided once per (guest, host) signature pair in this process."""
    key = (guest, host.signature if host is not None else None)
    if key not in _verdicts:
        if len(_verdicts) >= VERDICT_CACHE_SIZE:
            _verdicts.clear()
        _verdicts[key] = _decide(guest, host)
    return _verdicts[key]


def cache_size() -> int:
    """Verdicts held (the tests see a pair decided once)."""
    return len(_verdicts)


def clear_cache() -> None:
    """Forget every verdict and parsed guest CPU (a benchmark timing a cold plan)."""
    _verdicts.clear()
    guest_cpu_sig.cache_clear()
