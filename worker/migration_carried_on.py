"""A migration libvirt carried on after the call that started it returned an error.

The migration call's error is what this worker's connection heard, not always libvirt's
verdict. A worker stopped past libvirtd's keepalive (SIGSTOP, a host thrashing in swap, a
debugger) has its connection closed by libvirtd: the call returns "connection closed due to
keepalive timeout" or "received hangup event", while libvirtd goes on with the peer-to-peer
migration it runs by itself and lands the guest. Judged by that error, the job said failed
and asked for a rollback of a guest that was arriving (fault probe).

So a failed call is judged only once libvirt on this host shows no migration job on the
guest: while it shows one, perform re-attaches to it (a fresh connection, the same watch
recovery uses: progress, the policy, the operator's abort, the drain) until libvirt shows
none, and then libvirt says how it ended. A guest that left this host completed (finish
then checks it on the destination); one still here failed, as before. A migration that
ended before the worker came back (no job left to follow) is judged the same way, with the
destination asked whether it runs the guest (`landed_anyway`). A call that returned
over a live connection leaves no job behind (libvirt ends its job before it answers), so
nothing changes for those: a managed-direct migration whose destination did not answer is
still failed with libvirt's error, its guest resumed here. The exception is a post-copy
that broke, which libvirt keeps listed: any guest libvirt shows in a post-copy is left to
the post-copy recovery (worker/postcopy_recovery.py), which resumes it or says it is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

from config.events import get_logger
from config.policy_model import MigrationPolicy
from jobs.model import Job
from worker.libvirt_host import Domain, LibvirtError, LibvirtUnavailable
from worker.libvirt_states import StatsUnanswered, migration_stats, state_reason
from worker.migration_watch import Watched
from worker.phase_source import job_domain
from worker.postcopy_recovery import ANSWER_WITHIN_S
from worker.postcopy_whereabouts import locate
from worker.recovery_perform import watch_until_idle
from worker.runtime import Runtime

log = get_logger()


@dataclass(frozen=True)
class SecondLook:
    """libvirt's word on a migration whose call returned an error: whether the guest landed
    all the same, and what the watch saw if one followed the migration."""

    landed: bool = False
    seen: Watched | None = None


# libvirt's words for a migration call that never started one: another job held the guest
# (a migration, or any job past the state change lock's wait). The migration libvirt shows
# then is that other job's, never this one's to follow, judge or abort.
NEVER_STARTED = ("another migration job is already running", "cannot acquire state change lock")


def second_look(rt: Runtime, job: Job, policy: MigrationPolicy, error: str | None) -> SecondLook:
    """Follow the migration while libvirt still runs it, then say whether it landed; with
    none left to follow, whether it landed while this worker could not hear it. A call that
    never started one has nothing to follow: its error stands."""
    if error is not None and any(words in error for words in NEVER_STARTED):
        return SecondLook()
    carried = still_migrating(rt, job)
    if carried is not None:
        seen, landed = follow(rt, job, carried, policy, error)
        return SecondLook(landed, seen)
    shown = landed_anyway(rt, job)
    if shown is not None:
        reason = f"the migration call returned ({error}), but libvirt shows {shown}"
        log.warning("migration.carried_on", reason=reason)
        return SecondLook(landed=True)
    return SecondLook()


def still_migrating(rt: Runtime, job: Job) -> Domain | None:
    """The job's guest, looked up on a connection that answers, when libvirt on this host
    still shows a migration job on it; None when it shows none, or cannot be asked (the
    call's error then stands). A connection closed under the call is known closed by now
    (libvirt's client marks it), and the runtime opens a new one on the first lookup; the
    lookup is made twice, never by closing the connection every job of this worker shares
    (a managed-direct migration on it would be aborted)."""
    for _ in range(2):
        try:
            dom = job_domain(rt, job, job.spec.domain)
            if dom is None:
                return None
            if state_reason(dom).in_postcopy:  # the post-copy recovery's to judge, resume
                return None
            try:
                return dom if migration_stats(dom) is not None else None
            except StatsUnanswered:  # its job lock is held: by the migration, still running
                return dom
        except LibvirtUnavailable:
            return None
        except LibvirtError:  # the closed connection's first use: once more, on a new one
            continue
    return None


def follow(
    rt: Runtime, job: Job, dom: Domain, policy: MigrationPolicy, error: str | None
) -> tuple[Watched, bool]:
    """Watch the migration libvirt carries on until it shows no job on `dom`; what the
    watch saw, and whether the guest then left this host (libvirt completed the move)."""
    log.warning(
        "migration.carried_on",
        reason=f"the migration call returned ({error}) while libvirt still migrates "
        f"{job.spec.domain}: following it until libvirt says how it ends",
    )
    seen = watch_until_idle(rt, job, dom, policy)
    if seen.handed_over is not None:
        return seen, False
    after = job_domain(rt, job, job.spec.domain)
    return seen, after is None or not after.isActive()


def landed_anyway(rt: Runtime, job: Job) -> str | None:
    """After a failed call, with no migration job left here: how libvirt shows the guest
    moved all the same (the migration ended while this worker could not hear it, frozen
    past the keepalive), or None.

    Landed: gone from this host and running on the destination, not hung in a post-copy
    (`Whereabouts.landed`). A guest in a post-copy, running or broken, is the post-copy
    recovery's to judge. A destination that cannot be reached, for a guest gone from here
    with no post-copy recorded, gets its say in finish, which looks there itself (as
    recovery goes on once the guest left the source). Anything else leaves the call's error
    standing."""
    try:
        seen = locate(rt, job, ANSWER_WITHIN_S)
    except (LibvirtUnavailable, LibvirtError):
        return None
    if seen.in_postcopy:
        return None
    if seen.landed:
        return seen.describe()
    gone = seen.source is None or not seen.source.active
    if gone and not seen.reachable and rt.store.get(job.id).postcopy_since is None:
        return f"{seen.describe()}: finish looks at {job.spec.dst} itself"
    return None
