"""Watching a migration and acting on what the policy or the operator decides about it.

One watch for both ways a worker follows a migration: perform, which made the call and waits
for it to return (worker/phase_perform.py), and recovery, which re-attached to one libvirtd
carried on while its worker was away (worker/recovery_perform.py). Both get the monitor's
pace, its drain (warm shutdown) and its Redis-outage handling (worker/monitor.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from config.events import get_logger
from jobs.model import Job
from worker.convergence import Action, ConvergencePolicy, drain_action
from worker.libvirt_host import Domain, LibvirtError
from worker.monitor import MigrationMonitor, Progress
from worker.runtime import Runtime

log = get_logger()


def carry_out(dom: Domain, action: Action) -> bool:
    """Make libvirt do what the policy (or the operator) decided about a running migration;
    whether libvirt did.

    A refusal is logged and the migration goes on: it may still converge, and the fleet's
    hard limit (tunables.migration_timeout) aborts it in the end.
    """
    if action.kind in ("suspend", "postcopy"):
        log.warning("migration.timeout", action=action.kind, reason=action.reason)
    else:
        log.warning("migration.aborting", reason=action.reason, by=action.kind)
    try:
        if action.kind == "suspend":
            dom.suspend()  # the guest resumes on arrival (unless --suspend asked otherwise)
        elif action.kind == "postcopy":
            dom.migrateStartPostCopy()
        else:
            dom.abortJob()
    except LibvirtError as exc:
        log.warning("migration.action_failed", action=action.kind, error=exc.get_error_message())
        return False
    return True


@dataclass
class Watched:
    """What the watch saw of a migration: why it was cancelled (the operator's abort, carried
    out) or aborted (by the policy or the drain), whether it was handed over, its last
    progress."""

    cancel_reason: str | None = None
    abort_reason: str | None = None
    handed_over: str | None = None
    last: Progress | None = None
    reattached: bool = False


def watch_migration(
    rt: Runtime, job: Job, dom: Domain, finished: threading.Event, *, until_idle: bool = False
) -> Watched:
    """Report and steer the job's migration until `finished` is set (or, `until_idle`, until
    libvirt shows no migration job on `dom`)."""
    spec, tunables = job.spec, rt.settings.tunables
    seen = Watched()

    def on_progress(p: Progress) -> None:
        if until_idle and not seen.reattached:
            seen.reattached = True
            log.info("migration.reattached")
        log.info("migration.progress", **p.as_event_fields())

    def on_action(action: Action) -> None:
        if action.kind == "cancel":
            seen.cancel_reason = action.reason
        elif action.kind == "abort":
            seen.abort_reason = action.reason
        done = carry_out(dom, action)
        if done and action.kind == "postcopy":
            rt.store.mark_postcopy(job.id)  # from now on an abort cannot be carried out
        elif not done and action.kind == "cancel":
            # The operator's abort cannot be carried out (libvirt refuses to abort a post-copy
            # migration): the migration goes on, and the request is not left pending.
            rt.store.withdraw_abort(job.id)
            seen.cancel_reason = None
            log.warning("migration.abort_refused", reason=action.reason)

    monitor = MigrationMonitor(
        dom,
        interval=tunables.progress_interval,
        policy=ConvergencePolicy.for_job(spec, tunables.migration_timeout),
        on_progress=on_progress,
        on_action=on_action,
        # Read once per tick, never waiting out a Redis outage: libvirt migrates meanwhile.
        abort_requested=lambda: rt.store.without_retry.abort_requested(job.id),
        drain=lambda: drain_action(spec, rt.drained_for(), tunables.drain_timeout),
        until_idle=until_idle,
    )
    monitor.run(finished)
    seen.last = monitor.last
    seen.handed_over = monitor.handed_over.reason if monitor.handed_over else None
    return seen
