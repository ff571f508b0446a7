"""Candidates for an evacuation built from published host facts, and a whole plan from them.

No libvirt here: every destination's memory, running groups and CPU come from the record its
worker published (jobs/host_facts.py); reservations, maintenance and liveness are read from
Redis by the caller (worker/fleet_view.py), fresh. Free of Redis too, so the bench
(bench/scale.py) can time a 1,000-guest, 200-host plan on facts alone with `plan_from_facts`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from jobs.evacuation import Placement
from jobs.host_facts import HostCpu, HostFacts
from worker.cpu_compat import GuestCpu, GuestCpuSig, cpu_refusal, guest_cpu_sig
from worker.host_memory import room_mib
from worker.placement import Candidate, Estimate, Guest, plan


def guest_signatures(
    cpus: Mapping[str, GuestCpu], source_cpus: list[HostCpu]
) -> dict[str, GuestCpuSig]:
    """Each guest's (by uuid) CPU signature; host-passthrough ones carry the source's CPU."""
    source = {c.virt_type: c.signature for c in source_cpus}
    return {
        uuid: guest_cpu_sig(cpu.virt_type, cpu.cpu_xml, source.get(cpu.virt_type))
        for uuid, cpu in cpus.items()
    }


def candidate(
    facts: HostFacts,
    by_sig: Mapping[GuestCpuSig, list[str]],
    *,
    reserved_mib: int,
    limit_mib: int | None,
    heading: Counter[str] | None = None,
) -> Candidate:
    """One destination as its facts describe it: room after reservations and the registry's
    limit, the anti-affinity groups running there or on their way, and the guests (by uuid,
    grouped by CPU signature so each distinct CPU is judged once) whose CPU it cannot run."""
    groups: Counter[str] = Counter(d.group for d in facts.domains if d.group is not None)
    if heading:
        groups.update(heading)
    refusals: dict[str, str] = {}
    for sig, uuids in by_sig.items():
        why = cpu_refusal(sig, facts.cpu(sig.virt_type))
        if why is not None:
            refusals.update(dict.fromkeys(uuids, why))
    return Candidate(
        name=facts.host,
        free_mib=room_mib(facts.free_mib, facts.active_mib, reserved_mib, limit_mib),
        groups=groups,
        cpu_refusals=refusals,
    )


def candidates_from_facts(
    facts_by_host: Mapping[str, HostFacts | str],
    sigs: Mapping[str, GuestCpuSig],
    *,
    reserved_mib: Mapping[str, int] | None = None,
    limits_mib: Mapping[str, int | None] | None = None,
    heading: Mapping[str, Counter[str]] | None = None,
) -> tuple[list[Candidate], dict[str, str]]:
    """Candidates from the hosts whose facts are usable; the others, with why, apart."""
    by_sig: dict[GuestCpuSig, list[str]] = {}
    for uuid, sig in sigs.items():
        by_sig.setdefault(sig, []).append(uuid)
    candidates, unavailable = [], {}
    for name, facts in facts_by_host.items():
        if isinstance(facts, str):
            unavailable[name] = facts
            continue
        candidates.append(
            candidate(
                facts,
                by_sig,
                reserved_mib=(reserved_mib or {}).get(name, 0),
                limit_mib=(limits_mib or {}).get(name),
                heading=(heading or {}).get(name),
            )
        )
    return candidates, unavailable


def plan_from_facts(
    guests: list[Guest],
    cpus: Mapping[str, GuestCpu],
    facts_by_host: Mapping[str, HostFacts | str],
    estimate: Estimate,
    *,
    source_cpus: list[HostCpu] | None = None,
    reserved_mib: Mapping[str, int] | None = None,
    limits_mib: Mapping[str, int | None] | None = None,
    heading: Mapping[str, Counter[str]] | None = None,
    unavailable: Mapping[str, str] | None = None,
) -> list[Placement]:
    """A drain's placements from published facts alone (worker/placement.py's rules).

    `cpus` by guest uuid; `facts_by_host` as jobs/host_facts.py `read_facts` returns it (a
    reason in place of a host's facts makes it unavailable, named in unplaced guests'
    reasons, like the hosts in `unavailable`: maintenance, no live worker).
    """
    sigs = guest_signatures(cpus, source_cpus or [])
    candidates, missing = candidates_from_facts(
        facts_by_host, sigs, reserved_mib=reserved_mib, limits_mib=limits_mib, heading=heading
    )
    return plan(guests, candidates, {**(unavailable or {}), **missing}, estimate)
