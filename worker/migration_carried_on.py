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
then checks it on the destination); one still here failed, as before. A call that returned
over a live connection leaves no job behind (libvirt ends its job before it answers), so
nothing changes for those: a managed-direct migration whose destination did not answer is
still failed with libvirt's error, its guest resumed here.
"""

from __future__ import annotations

import threading

from config.events import get_logger
from config.policy_model import MigrationPolicy
from jobs.model import Job
from worker.libvirt_host import Domain, LibvirtError, LibvirtUnavailable
from worker.libvirt_states import StatsUnanswered, migration_stats
from worker.migration_watch import Watched, watch_migration
from worker.phase_source import job_domain
from worker.runtime import Runtime

log = get_logger()


def still_migrating(rt: Runtime, job: Job) -> Domain | None:
    """The job's guest, looked up on a connection that answers (reopened once if the one
    the call used died), when libvirt on this host still shows a migration job on it;
    None when it shows none, or cannot be asked (the call's error then stands)."""
    for _ in range(2):
        try:
            dom = job_domain(rt, job, job.spec.domain)
            if dom is None:
                return None
            try:
                return dom if migration_stats(dom) is not None else None
            except StatsUnanswered:  # its job lock is held: by the migration, still running
                return dom
        except LibvirtUnavailable:
            return None
        except LibvirtError:  # a connection that looked alive and was not: once more
            rt.libvirt.reset()
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
    seen = watch_migration(rt, job, dom, threading.Event(), policy=policy, until_idle=True)
    if seen.handed_over is not None:
        return seen, False
    after = job_domain(rt, job, job.spec.domain)
    return seen, after is None or not after.isActive()
