"""A host's facts as its worker publishes them in Redis, for the evacuation planner.

Each worker writes its own host's record every report tick with a time to live
(`tunables.host_facts_ttl`): memory, the hypervisor's CPU (per virt type), the running domains
with their memory and anti-affinity group. The planner reads these records instead of
opening a libvirt connection to every candidate (a 200-host fleet would be 200 connections
per plan), and so must treat them as what they are: a claim anyone holding the Redis
password could have written, perhaps seconds old. Hence a strict model with bounded sizes,
a size check before parsing, and a judgement per host (`read_facts`) that turns a missing,
expired, future-dated or malformed record into a reason, never an exception. The
destination's own prepare re-checks memory and CPU against its libvirtd before anything
moves (worker/phase_destination.py): the facts only choose, libvirt has the last word.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Annotated, cast

import redis
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints
from pydantic import ValidationError as ValidationError

from jobs.keys import host_facts_key

# Bounds of one record. Generous for a real host (libvirt's x86 models number ~60 and their
# features ~150; a host running 1,000 guests is far beyond today's fleets), small enough that
# a hostile record cannot make the planner parse megabytes per host.
MAX_FACTS_BYTES = 1_048_576
MAX_DOMAINS = 2048
MAX_CPU_MODELS = 512
MAX_CPU_FEATURES = 1024
MAX_VIRT_TYPES = 4
MAX_TEXT = 1024

# CPU model, feature, vendor, arch and virt type names as libvirt spells them.
CPU_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+\-]{0,63}$"
CpuName = Annotated[str, StringConstraints(pattern=CPU_NAME_PATTERN)]
# Domain, group, host and worker names: libvirt allows nearly anything in the first two, so
# only the length is bounded (the planner compares them, never shows or executes them).
Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT)]
Reason = Annotated[str, StringConstraints(max_length=4 * MAX_TEXT)]
Mib = Annotated[int, Field(ge=0, le=1 << 40)]  # up to an exbibyte: a bound, not a prediction


class HostCpu(BaseModel):
    """What one virt type of the host's hypervisor offers guests (libvirt's domain
    capabilities): its host-model CPU with every feature expanded, the custom models QEMU
    can run here, and whether host-passthrough is possible."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    virt_type: CpuName
    arch: CpuName
    vendor: CpuName | None = None
    model: CpuName | None = None  # the host-model CPU's model name
    features: frozenset[CpuName] = Field(default=frozenset(), max_length=MAX_CPU_FEATURES)
    usable_models: frozenset[CpuName] = Field(default=frozenset(), max_length=MAX_CPU_MODELS)
    host_model: bool = False  # mode host-model supported
    host_passthrough: bool = False  # mode host-passthrough supported
    maximum: bool = False  # mode maximum supported (TCG offers it, not host-passthrough)

    @property
    def signature(self) -> str:
        """A digest of everything the CPU rule reads: equal signatures, equal verdicts (the
        key of the compatibility cache, worker/cpu_compat.py). Computed on each use (a few
        microseconds, once per host per distinct guest CPU in a plan): a cached value would
        survive `model_copy(update=...)` and describe the wrong CPU."""
        parts = [
            self.virt_type,
            self.arch,
            self.vendor or "",
            self.model or "",
            ",".join(sorted(self.features)),
            ",".join(sorted(self.usable_models)),
            f"{self.host_model}:{self.host_passthrough}:{self.maximum}",
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


class RunningDomain(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Text
    memory_mib: Mib
    group: Text | None = None  # its anti-affinity group (worker/domain_metadata.py)


class HostFacts(BaseModel):
    """One host's inventory, as its worker saw it through its own libvirtd at `ts`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: Text
    worker: Text
    ts: AwareDatetime
    # libvirt's free memory (page cache included) and what running domains hold: the
    # planner applies reservations (read fresh) and the registry's limit itself.
    free_mib: Mib
    active_mib: Mib
    cpus: list[HostCpu] = Field(default=[], max_length=MAX_VIRT_TYPES)
    domains: list[RunningDomain] = Field(default=[], max_length=MAX_DOMAINS)
    # QEMU migration TLS certificates in place (worker/tls_facts.py); None: not reported.
    migration_tls: bool | None = None
    # Set when the worker could not read its libvirtd: the record then says only that.
    error: Reason | None = None

    def cpu(self, virt_type: str) -> HostCpu | None:
        return next((c for c in self.cpus if c.virt_type == virt_type), None)


def publish_facts(r: redis.Redis, facts: HostFacts, ttl_s: float) -> None:
    r.set(host_facts_key(facts.host), facts.model_dump_json(), px=int(ttl_s * 1000))


def judge(
    host: str, raw: str | None, now: datetime, max_age_s: float, skew_s: float
) -> HostFacts | str:
    """A host's record if it can be used to plan, else why not (one line, for the plan)."""
    missing = "no recent facts from its worker"
    if raw is None:
        return f"{missing} (none published, or expired)"
    if len(raw) > MAX_FACTS_BYTES:
        return f"{missing} (its record is over {MAX_FACTS_BYTES} bytes)"
    try:
        facts = HostFacts.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        return f"{missing} (invalid record: {where}: {first['msg']})"
    if facts.host != host:
        return f"{missing} (the record names another host)"
    age = (now - facts.ts).total_seconds()
    if age > max_age_s:
        return f"{missing} (last published {age:.0f} s ago)"
    if age < -skew_s:
        return f"{missing} (its record is dated {-age:.0f} s in the future)"
    if facts.error is not None:
        return f"its worker cannot read libvirtd: {facts.error}"
    return facts


def read_facts(
    r: redis.Redis, hosts: list[str], max_age_s: float, skew_s: float
) -> dict[str, HostFacts | str]:
    """Every host's usable record, or the reason it has none; one round trip for all."""
    if not hosts:
        return {}
    raws = cast(list[str | None], r.mget([host_facts_key(h) for h in hosts]))
    now = datetime.now(UTC)
    return {h: judge(h, raw, now, max_age_s, skew_s) for h, raw in zip(hosts, raws, strict=True)}
