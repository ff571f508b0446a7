"""Where each domain of an evacuated host goes: the placement policy, free of libvirt.

The facts come in already gathered (worker/fleet_view.py); this module only decides, so it
can be read, and tested, on its own. The rules, in order:

- a host in maintenance, without a live worker, or without recent facts from its worker is
  never a destination;
- the destination must run the domain's CPU (judged from its published CPU facts while
  gathering, worker/cpu_compat.py; libvirt checks again in the destination's prepare);
- domains of one anti-affinity group never share a destination, nor join a domain of their
  group already running there;
- the destination must have the memory free, counting what is already reserved there
  (migrations in flight and planned) and what this plan has placed so far.

Running domains are placed first, largest first (first-fit decreasing packs best), each on
the eligible host with the most memory left (which spreads the load); ties go by host name so
the same facts always give the same plan (a dry run shows what a real run then does).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from config.policy_model import MigrationPolicy, PolicyAction
from jobs.evacuation import Placement

# An unplaced guest's reason names this many hosts' refusals, then counts the rest: over a
# 200-host fleet a full list would be kilobytes per guest in the plan, and unreadable.
REASONS_NAMED = 10

# An offline migration moves only a definition: no memory to place, a fraction of a second.
OFFLINE_ESTIMATE_S = 0.1

# What each convergence action means for a guest that dirties memory faster than its link
# copies it (the dry run's `convergence`); raising the allowed downtime alone never settles
# such a guest, and throttling may or may not, so the policy's next action is named too.
_NEEDS = {
    PolicyAction.THROTTLE: "throttling (auto-converge)",
    PolicyAction.POSTCOPY: "post-copy likely",
    PolicyAction.SUSPEND: "will not converge without suspend",
    PolicyAction.ABORT: "will not converge: the policy aborts it",
}


@dataclass(frozen=True)
class Guest:
    domain: str
    uuid: str
    memory_mib: int
    active: bool
    persistent: bool
    group: str | None = None
    policy: str | None = None  # the policy its libvirt metadata names (worker/domain_metadata.py)
    dirty_mib_s: float | None = None  # libvirt's last measured dirty rate, if one was measured
    local_disks: int = 0  # disks --copy-storage would copy (worker/local_disks.py)

    def placement(self, reason: str | None = None) -> Placement:
        """The guest as a plan row: where it goes is filled in by `plan`; `reason` says why
        it has no destination."""
        return Placement(
            domain=self.domain,
            uuid=self.uuid,
            memory_mib=self.memory_mib,
            active=self.active,
            persistent=self.persistent,
            group=self.group,
            local_disks=self.local_disks,
            reason=reason,
        )


@dataclass
class Candidate:
    """A host that may receive guests, and what it can still take."""

    name: str
    free_mib: int
    groups: Counter[str] = field(default_factory=Counter)
    # Guests (by uuid) whose CPU this host cannot run; the reason per guest.
    cpu_refusals: dict[str, str] = field(default_factory=dict)
    # Why this host cannot take a --tls drain's live guests (its migration certificates
    # missing); an offline move sends no memory, and takes no TLS (probe: a shut-off guest
    # was left behind for it).
    tls_refusal: str | None = None


@dataclass(frozen=True)
class Estimate:
    """The dry run's figures: QEMU start-up, then the guest's memory at the fleet's rate, or
    at its policy's pre-copy cap when that is lower."""

    startup_s: float
    mib_per_s: float

    def rate(self, cap_mib: int = 0) -> float:
        """MiB/s to count on under a pre-copy cap of `cap_mib` (0: no cap)."""
        return min(self.mib_per_s, float(cap_mib)) if cap_mib > 0 else self.mib_per_s

    def seconds(self, guest: Guest, cap_mib: int = 0) -> float:
        if not guest.active:
            return OFFLINE_ESTIMATE_S
        return round(self.startup_s + guest.memory_mib / self.rate(cap_mib), 1)

    def convergence(self, guest: Guest, name: str, policy: MigrationPolicy) -> str | None:
        """What the guest will need to land under policy `name`, judged from its dirty rate
        against the rate it will be copied at; None when libvirt measured no dirty rate."""
        if not guest.active or guest.dirty_mib_s is None:
            return None
        rate = self.rate(policy.bandwidth_mib)
        figures = f"dirties {guest.dirty_mib_s:.0f} MiB/s, copied at {rate:.0f} MiB/s"
        if guest.dirty_mib_s < rate:
            return f"pre-copy converges ({figures})"
        needs = []
        for action in policy.actions:
            if action in _NEEDS:
                needs.append(_NEEDS[action])
                if action is not PolicyAction.THROTTLE:
                    break
        if not needs:
            return f"will not converge: policy {name} takes no action ({figures})"
        return f"{', then '.join(needs)} ({figures})"


def _order(guests: list[Guest]) -> list[Guest]:
    return sorted(guests, key=lambda g: (not g.active, -g.memory_mib, g.domain))


def _why_not(guest: Guest, host: Candidate) -> str | None:
    if guest.uuid in host.cpu_refusals:
        return f"{host.name}: {host.cpu_refusals[guest.uuid]}"
    if guest.active and host.tls_refusal is not None:
        return f"{host.name}: {host.tls_refusal}"
    if guest.group is not None and host.groups[guest.group]:
        return f"{host.name}: anti-affinity group {guest.group} already there"
    need = guest.memory_mib if guest.active else 0
    if host.free_mib < need:
        return f"{host.name}: {host.free_mib} MiB free, needs {need} MiB"
    return None


def _summary(reasons: list[str]) -> str:
    named = "; ".join(reasons[:REASONS_NAMED])
    more = len(reasons) - REASONS_NAMED
    return f"{named}; and {more} more host{'s' if more > 1 else ''}" if more > 0 else named


def plan(
    guests: list[Guest],
    candidates: list[Candidate],
    unavailable: dict[str, str],
    estimate: Estimate,
) -> list[Placement]:
    """A placement for every guest; unplaced ones carry the reason per host considered."""
    placements = []
    for guest in _order(guests):
        refusals = []
        eligible = []
        for host in candidates:
            why = _why_not(guest, host)
            if why is None:
                eligible.append(host)
            else:
                refusals.append(why)
        base = guest.placement()
        if not eligible:
            others = [f"{name}: {why}" for name, why in sorted(unavailable.items())]
            reason = _summary(refusals + others) or "no other host in the registry"
            placements.append(base.model_copy(update={"reason": f"no destination ({reason})"}))
            continue
        best = min(eligible, key=lambda h: (-h.free_mib, h.name))
        if guest.active:
            best.free_mib -= guest.memory_mib
        if guest.group is not None:
            best.groups[guest.group] += 1
        placements.append(
            base.model_copy(
                update={"destination": best.name, "estimate_s": estimate.seconds(guest)}
            )
        )
    return placements
