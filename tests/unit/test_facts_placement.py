"""Planning from published host facts: the CPU rules and their cache, memory, groups and
hosts without usable facts; and the planner opening no libvirt connection to a candidate."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import libvirt
import pytest

from jobs.evacuation import EvacuationSpec
from jobs.host_facts import HostCpu, HostFacts, RunningDomain, publish_facts, read_facts
from jobs.store import JobStore
from lab.synthetic_facts import publish_synthetic_facts, synthetic_fleet
from tests.unit import test_libvirt_seam as seam
from worker import cpu_compat
from worker.cpu_compat import GuestCpu, GuestCpuSig, cpu_refusal, guest_cpu_sig
from worker.facts_placement import plan_from_facts
from worker.fleet_view import gather
from worker.ledger import Ledger
from worker.libvirt_host import LibvirtHost
from worker.placement import Estimate, Guest
from worker.runtime import Runtime

env = seam.env  # the seam tests' fixtures: a registry file, the test hypervisor
hv = seam.hv
ESTIMATE = Estimate(startup_s=2.0, mib_per_s=100.0)
HOST = HostCpu(
    virt_type="kvm",
    arch="x86_64",
    vendor="Intel",
    model="Skylake-Client",
    features=frozenset({"sse4.2", "avx2", "vmx", "hypervisor"}),
    usable_models=frozenset({"qemu64", "Skylake-Client", "Haswell"}),
    host_model=True,
    host_passthrough=True,
)
OTHER = HOST.model_copy(update={"model": "Icelake-Server", "features": HOST.features | {"avx512f"}})


def custom(model: str, *features: tuple[str, str], vendor: str | None = None) -> str:
    feats = "".join(f"<feature policy='{p}' name='{n}'/>" for p, n in features)
    v = f"<vendor>{vendor}</vendor>" if vendor else ""
    return f"<cpu mode='custom' match='exact'><model>{model}</model>{v}{feats}</cpu>"


def sig(cpu_xml: str | None, virt_type: str = "kvm", source: str | None = None) -> GuestCpuSig:
    return guest_cpu_sig(virt_type, cpu_xml, source)


def test_the_cpu_rules() -> None:
    ok = [
        sig(None),
        sig(custom("Haswell", ("require", "avx2"), ("disable", "avx512f"), ("force", "x"))),
        sig(custom("Skylake-Client", ("forbid", "avx512f"), vendor="Intel")),
        sig("<cpu mode='host-model'/>"),
        sig("<cpu mode='host-passthrough'/>", source=HOST.signature),
    ]
    for guest in ok:
        assert cpu_refusal(guest, HOST) is None, guest
    refused = {
        sig(custom("Icelake-Server")): "Icelake-Server is not usable on its kvm hypervisor",
        sig(custom("Haswell", ("require", "avx512f"))): "lacks avx512f",
        sig(custom("Haswell", ("forbid", "vmx"))): "has forbidden vmx",
        sig(custom("Haswell", vendor="AMD")): "vendor AMD, the host's is Intel",
        sig("<cpu mode='host-passthrough'/>", source=OTHER.signature): "identical to the source",
        sig(custom("qemu64"), virt_type="qemu"): "offers no qemu guests",
    }
    for guest, why in refused.items():
        reason = cpu_refusal(guest, HOST if guest.virt_type == "kvm" else None)
        assert reason is not None and reason.startswith("cannot run the guest's CPU model"), guest
        assert why in reason, reason
    bare = HOST.model_copy(update={"host_model": False, "host_passthrough": False})
    assert "host-model is not supported" in (
        cpu_refusal(sig("<cpu mode='host-model'/>"), bare) or ""
    )


def test_each_guest_and_host_cpu_pair_is_decided_once(monkeypatch: pytest.MonkeyPatch) -> None:
    decided: list[tuple[GuestCpuSig, str | None]] = []
    real = cpu_compat._decide

    def counting(guest: GuestCpuSig, host: HostCpu | None) -> str | None:
        decided.append((guest, host.signature if host else None))
        return real(guest, host)

    monkeypatch.setattr(cpu_compat, "_decide", counting)
    monkeypatch.setattr(cpu_compat, "_verdicts", {})
    guests = [Guest(f"g{i}", f"u{i}", 64, True, True) for i in range(40)]
    kinds = [custom("Haswell"), custom("Skylake-Client", ("require", "avx512f"))]
    cpus = {g.uuid: GuestCpu("kvm", kinds[i % 2]) for i, g in enumerate(guests)}
    facts: dict[str, HostFacts | str] = {
        f"h{i}": facts_for(f"h{i}", cpu=HOST if i % 2 else OTHER) for i in range(10)
    }
    placements = plan_from_facts(guests, cpus, facts, ESTIMATE)
    assert len(decided) == len(set(decided)) == 4  # 2 guest CPUs x 2 host CPUs, once each
    by_domain = {p.domain: p.destination for p in placements}
    assert all(by_domain[f"g{i}"] in {"h0", "h2", "h4", "h6", "h8"} for i in range(1, 40, 2))
    plan_from_facts(guests, cpus, facts, ESTIMATE)  # a second plan: all from the cache
    assert len(decided) == 4


def facts_for(
    host: str,
    *,
    free: int = 8192,
    active: int = 0,
    cpu: HostCpu = HOST,
    groups: tuple[str, ...] = (),
) -> HostFacts:
    domains = [RunningDomain(name=f"{host}-{g}", memory_mib=64, group=g) for g in groups]
    return HostFacts(
        host=host,
        worker="w",
        ts=datetime.now(UTC),
        free_mib=free,
        active_mib=active,
        cpus=[cpu],
        domains=domains,
    )


def test_memory_groups_and_hosts_without_facts_from_the_records() -> None:
    guests = [
        Guest("web-2", "u1", 1024, True, True, group="web"),
        Guest("db", "u2", 3000, True, True),
    ]
    cpus = {"u1": GuestCpu("kvm", None), "u2": GuestCpu("kvm", custom("Haswell"))}
    facts: dict[str, HostFacts | str] = {
        "h1": facts_for("h1", free=8192, groups=("web",)),  # web already runs there
        "h2": facts_for("h2", free=8192, active=6000),  # its registry limit leaves 2192
        "h3": facts_for("h3", free=4000),  # 3000 of it reserved by jobs in flight
        "h4": "no recent facts from its worker (last published 60 s ago)",
    }
    placements = plan_from_facts(
        guests,
        cpus,
        facts,
        ESTIMATE,
        reserved_mib={"h3": 3000},
        limits_mib={"h2": 8192},
        heading={"h2": Counter({"other": 1})},
        unavailable={"h5": "in maintenance (disks)"},
    )
    by = {p.domain: p for p in placements}
    assert by["db"].destination == "h1" and by["web-2"].destination == "h2"
    assert by["db"].reason is None
    alone = plan_from_facts([guests[1]], cpus, {k: facts[k] for k in ("h2", "h3", "h4")}, ESTIMATE,
                            reserved_mib={"h3": 3000}, limits_mib={"h2": 8192})  # fmt: skip
    assert alone[0].destination is None
    assert alone[0].reason == (
        "no destination (h2: 2192 MiB free, needs 3000 MiB; h3: 1000 MiB free, needs 3000 MiB; "
        "h4: no recent facts from its worker (last published 60 s ago))"
    )


def test_a_synthetic_fleet_drain_places_every_guest_from_redis(store: JobStore) -> None:
    fleet = synthetic_fleet(hosts=200, guests=1000)
    publish_synthetic_facts(store.r, fleet.facts, 60)
    facts = read_facts(store.r, [f.host for f in fleet.facts], 60, 5)
    assert all(isinstance(f, HostFacts) for f in facts.values())
    placements = plan_from_facts(
        fleet.guests, fleet.cpus, facts, ESTIMATE, source_cpus=fleet.source_cpus
    )
    assert len(placements) == 1000 and all(p.destination for p in placements)
    assert (
        plan_from_facts(fleet.guests, fleet.cpus, facts, ESTIMATE, source_cpus=fleet.source_cpus)
        == placements
    )  # the same facts, the same plan


def test_gather_opens_no_connection_to_a_candidate(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    opened: list[str] = []

    def opener(uri: str) -> libvirt.virConnect:
        opened.append(uri)
        return libvirt.open(seam.TEST_URI)

    rt = Runtime("kvm1", store, LibvirtHost(seam.TEST_URI, opener), Ledger(str(tmp_path / "l")))
    store.heartbeat("kvm2", 30, "w1")
    cpu = HostCpu(virt_type="test", arch="i686")
    publish_facts(store.r, facts_for("kvm2", cpu=cpu), 30)
    view = gather(rt, EvacuationSpec(host="kvm1"), "0123456789ab")
    assert [c.name for c in view.candidates] == ["kvm2"] and view.unavailable == {}
    assert set(opened) == {seam.TEST_URI}  # its own libvirtd only, never kvm2's peer URI
