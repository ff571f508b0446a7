"""What libvirt says a domain's state and its reason are, as drover needs to judge post-copy,
and the statistics of its migration job, as the monitor samples them.

A sibling of worker/libvirt_host.py (the seam; only the modules it names import libvirt).
libvirt names a post-copy migration in the reason, not the state: during post-copy the
source is paused (VIR_DOMAIN_PAUSED_POSTCOPY) and the destination running
(VIR_DOMAIN_RUNNING_POSTCOPY); once it failed (the stream broke, the peers lost each other
past the keepalive) the source is paused (VIR_DOMAIN_PAUSED_POSTCOPY_FAILED) and the
destination "running" (VIR_DOMAIN_RUNNING_POSTCOPY_FAILED) with QEMU `postcopy-paused`: the
guest runs nowhere until VIR_MIGRATE_POSTCOPY_RESUME. Resuming such a source (`resume()`)
blocks and fails; these helpers are how the worker tells the cases apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libvirt

from worker.libvirt_host import STATE_NAMES, Domain

_REASONS = {
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY): "post-copy",
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED): "post-copy failed",
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY): "post-copy",
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED): "post-copy failed",
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED): "migrated",
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION): "migrating",
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED): "migrated",
}
_POSTCOPY = frozenset(
    {
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY),
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED),
    }
)
_FAILED = frozenset(
    {
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED),
    }
)


@dataclass(frozen=True)
class StateReason:
    """A domain's state and reason codes as libvirt reports them (virDomainGetState)."""

    state: int
    reason: int

    @property
    def in_postcopy(self) -> bool:
        """Part of a post-copy migration, running or failed: never resumed, never aborted."""
        return (self.state, self.reason) in _POSTCOPY

    @property
    def postcopy_failed(self) -> bool:
        """A post-copy that broke: only VIR_MIGRATE_POSTCOPY_RESUME brings the guest back."""
        return (self.state, self.reason) in _FAILED

    @property
    def paused(self) -> bool:
        """Paused, for whatever reason (by its user, by its migration, by an error)."""
        return bool(self.state == libvirt.VIR_DOMAIN_PAUSED)

    @property
    def running(self) -> bool:
        """Running for real: not paused, and not a destination hung by a failed post-copy."""
        return self.state == libvirt.VIR_DOMAIN_RUNNING and not self.postcopy_failed

    @property
    def active(self) -> bool:
        return self.state not in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_NOSTATE)

    def describe(self) -> str:
        """As virsh's `domstate --reason` would say it: "paused (post-copy failed)"."""
        name = STATE_NAMES.get(self.state, str(self.state))
        why = _REASONS.get((self.state, self.reason))
        return f"{name} ({why})" if why else name


def state_reason(dom: Domain) -> StateReason:
    state, reason = dom.state()
    return StateReason(int(state), int(reason))


def paused_by_user(found: StateReason) -> bool:
    """Paused on request (`virsh suspend`, `virDomainSuspend`: a force-complete's or a
    policy's pause), not by the migration itself nor by an error."""
    paused = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)
    return (found.state, found.reason) == paused


def paused_for_postcopy(dom: Domain) -> bool:
    """Whether `dom` is a source paused by post-copy (running or failed): resume() on it
    blocks for libvirt's job timeout and fails, and would be wrong anyway."""
    found = state_reason(dom)
    return found.state == libvirt.VIR_DOMAIN_PAUSED and found.in_postcopy


def paused_for_switchover(dom: Domain) -> bool:
    """Whether libvirt shows `dom` paused by its migration (VIR_DOMAIN_PAUSED_MIGRATION): the
    switch-over of a live migration, the moment it holds its statistics back for. A state a
    domain object's lock answers, not the migration job's: it comes while jobStats waits.
    False when libvirt cannot say (the domain is gone on this host, the connection broke)."""
    try:
        found = state_reason(dom)
    except libvirt.libvirtError:
        return False
    return (found.state, found.reason) == (
        libvirt.VIR_DOMAIN_PAUSED,
        libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
    )


# A refusal that says nothing of the migration: the domain's job lock was not free in time.
# Any other error (gone, not running, unsupported, the daemon away) is taken as "no job".
_REFUSED = libvirt.VIR_ERR_OPERATION_TIMEOUT


class StatsUnanswered(Exception):
    """libvirt did not answer for the statistics this time (the domain's job lock stayed busy
    past its wait): that says nothing about whether the migration still runs."""


# libvirt's errors of a question about a domain's job that mean it runs none we can see.
NO_JOB_ERRORS = (
    libvirt.VIR_ERR_OPERATION_INVALID,  # not running
    libvirt.VIR_ERR_NO_DOMAIN,  # gone
    libvirt.VIR_ERR_NO_SUPPORT,  # a driver that has no job information
)


def has_job(dom: Domain) -> bool:
    """Whether libvirt runs a job (a migration) on `dom` now: its word, whatever a record
    says of the job's state. An answer held back (the domain's job lock busy past libvirt's
    wait, or refused as an incoming migration's) counts as a job. An inactive domain has none
    libvirt can show (it refuses the question: "domain is not running"), nor has one whose
    driver cannot answer (libvirt's test driver; QEMU's always can)."""
    try:
        return bool(dom.isActive()) and dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (_REFUSED, libvirt.VIR_ERR_OPERATION_UNSUPPORTED):
            return True
        if exc.get_error_code() in NO_JOB_ERRORS:
            return False  # stopped, or gone, between the questions; or never asked
        raise


def migrating_in(dom: Domain) -> bool:
    """Whether `dom` is a copy a migration is bringing in to this host (the destination's
    side): libvirt refuses its job's statistics there ("available only on the source host",
    seen on the lab). Not this host's guest (yet): its migration's job decides where it ends."""
    try:
        if not dom.isActive():
            return False
        dom.jobInfo()
    except libvirt.libvirtError as exc:
        return bool(exc.get_error_code() == libvirt.VIR_ERR_OPERATION_UNSUPPORTED)
    return False


def migration_stats(dom: Domain) -> dict[str, Any] | None:
    """libvirt's statistics of the domain's running migration, or None while there is none
    (or libvirt cannot say for good); StatsUnanswered when its job lock was busy too long."""
    try:
        stats: dict[str, Any] = dom.jobStats()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != _REFUSED:
            return None
        raise StatsUnanswered(exc.get_error_message() or str(exc)) from exc
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    return stats
