"""A synthetic fleet's host facts and a host's guests to drain, for bench/scale.py.

No hypervisor: `synthetic_fleet` makes the `HostFacts` records N workers would publish (two
CPU generations, running domains in anti-affinity groups) and the guests of the host being
drained with their `<cpu>` elements; `publish_synthetic_facts` writes the records to Redis
under the real keys, so the planner reads them exactly as it reads real workers' facts.
Drawn from a fixed seed: every run plans the same fleet.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import redis

from jobs.host_facts import HostCpu, HostFacts, RunningDomain, publish_facts
from jobs.record_marks import now
from worker.cpu_compat import GuestCpu
from worker.placement import Guest

SEED = 14
MIB_PER_GIB = 1024
# Two generations: the older's features a subset of the newer's, so guests of the older
# model fit everywhere and the newer's only on the newer hosts.
_BASE = [f"f{i}" for i in range(80)]
_NEWER = [f"n{i}" for i in range(20)]
_MODELS = [f"Model-{i}" for i in range(30)]
OLD = HostCpu(
    virt_type="kvm",
    arch="x86_64",
    vendor="Intel",
    model="Skylake-Client-IBRS",
    features=frozenset(_BASE),
    usable_models=frozenset([*_MODELS, "Skylake-Client-IBRS"]),
    host_model=True,
    host_passthrough=True,
)
NEW = OLD.model_copy(
    update={
        "model": "Icelake-Server",
        "features": frozenset(_BASE + _NEWER),
        "usable_models": frozenset([*_MODELS, "Skylake-Client-IBRS", "Icelake-Server"]),
    }
)
GUEST_CPUS = [
    "<cpu mode='custom' match='exact'><model>Skylake-Client-IBRS</model>"
    "<feature policy='require' name='f1'/><feature policy='disable' name='f2'/></cpu>",
    "<cpu mode='custom' match='exact'><model>Icelake-Server</model>"
    "<feature policy='require' name='n3'/></cpu>",
    "<cpu mode='host-passthrough'/>",
    None,
]


@dataclass(frozen=True)
class SyntheticFleet:
    facts: list[HostFacts]  # the destinations' records
    guests: list[Guest]  # the drained host's guests
    cpus: dict[str, GuestCpu]  # theirs, by uuid
    source_cpus: list[HostCpu]  # the drained host's own CPU (host-passthrough guests)


def synthetic_fleet(
    hosts: int = 200,
    guests: int = 1000,
    *,
    domains_per_host: int = 20,
    groups: int = 200,
    host_gib: int = 512,
    worker: str = "synthetic",
) -> SyntheticFleet:
    """`hosts` destinations (sim-0001...) each running `domains_per_host` domains, and
    `guests` guests to place, 1 to 16 GiB, in `groups` anti-affinity groups (some in none)."""
    rng = random.Random(SEED)
    ts = now()
    facts = []
    for h in range(hosts):
        running = [
            RunningDomain(
                name=f"vm-{h:04d}-{d:02d}",
                memory_mib=rng.choice((2, 4, 8)) * MIB_PER_GIB,
                group=f"g{rng.randrange(groups)}" if rng.random() < 0.5 else None,
            )
            for d in range(domains_per_host)
        ]
        active = sum(d.memory_mib for d in running)
        facts.append(
            HostFacts(
                host=f"sim-{h + 1:04d}",
                worker=worker,
                ts=ts,
                free_mib=max(host_gib * MIB_PER_GIB - active, 0),
                active_mib=active,
                cpus=[NEW if h % 5 < 2 else OLD],
                domains=running,
            )
        )
    placed, cpus = [], {}
    for g in range(guests):
        uuid = f"00000000-0000-4000-8000-{g:012d}"
        placed.append(
            Guest(
                domain=f"drain-{g:04d}",
                uuid=uuid,
                memory_mib=rng.choice((1, 2, 4, 8, 16)) * MIB_PER_GIB,
                active=True,
                persistent=True,
                group=f"g{rng.randrange(groups)}" if rng.random() < 0.3 else None,
            )
        )
        cpus[uuid] = GuestCpu("kvm", rng.choice(GUEST_CPUS))
    return SyntheticFleet(facts, placed, cpus, [OLD])


def publish_synthetic_facts(r: redis.Redis, facts: list[HostFacts], ttl_s: float) -> None:
    """Every record under its host's real key, with a time to live, in one round trip."""
    pipe = r.pipeline(transaction=False)
    for record in facts:
        publish_facts(pipe, record, ttl_s)
    pipe.execute()
