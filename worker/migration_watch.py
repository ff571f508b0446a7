"""Watching a migration and acting on what the policy or the operator decides about it.

One watch for both ways a worker follows a migration: perform, which made the call and waits
for it to return (worker/phase_perform.py), and recovery, which re-attached to one libvirtd
carried on while its worker was away (worker/recovery_perform.py). Both get the monitor's
pace, its drain (warm shutdown) and its Redis-outage handling (worker/monitor.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import libvirt

from config.events import get_logger
from config.policy_model import MigrationPolicy
from jobs.model import Job
from worker import job_locks, switch_asked
from worker.cancel_notice import abort_asked
from worker.convergence import ConvergenceEngine, Decision
from worker.ledger import Ledger
from worker.libvirt_events import CompletionWatch
from worker.libvirt_host import Domain, LibvirtError, facts
from worker.libvirt_states import state_reason
from worker.monitor import MigrationMonitor, Progress
from worker.runtime import Runtime
from worker.steering import Action, drain_action

log = get_logger()
DOWNTIME_STEPS = ("set_downtime", "raise_downtime")


def carry_out(dom: Domain, action: Action) -> bool | None:
    """Abort the migration, as the operator or the drain decided: True once libvirt did,
    False when libvirt refused (it cannot abort a post-copy migration), None when libvirt
    never heard it (the connection under the call was closed: a worker stopped past
    libvirtd's keepalive). A refusal is logged and the migration goes on.
    """
    log.warning("migration.aborting", reason=action.reason, by=action.kind)
    try:
        dom.abortJob()
    except LibvirtError as exc:
        log.warning("migration.action_failed", action=action.kind, error=exc.get_error_message())
        return None if unheard(exc) else False
    return True


def unheard(exc: LibvirtError) -> bool:
    """An error of the connection itself (libvirt's RPC layer: the socket closed, a keepalive
    timeout), not an answer of libvirtd's driver: the request never reached it."""
    return exc.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)


def carry_out_step(dom: Domain, decision: Decision, job_id: str, ledger: Ledger) -> bool:
    """Make libvirt do what the policy decided (a `policy.step` event either way); whether
    libvirt did. A refusal is said and the migration goes on: the policy takes its next
    action at the next trigger, and the fleet's hard limit ends it in the end.

    A downtime step is not made once the operator set the job's downtime (`drover tune
    --max-downtime`): someone who sets it by hand has taken it out of the policy's hands for
    that migration, as with `virsh migrate-setmaxdowntime`. The step is still said (done
    false, held_by operator); the policy's other steps go on. The operator's figure is in
    this host's ledger, so it holds across a restart of this worker (a probe's re-attached
    watch raised it again from 777 ms to 9 s), and the look and the call are made under the
    job's lock, as the operator's tune is (worker/job_locks.py): a tune racing the policy's
    first step is made after it, never overwritten by it."""
    if decision.action not in DOWNTIME_STEPS:
        return _made(dom, decision, job_id, ledger)
    with job_locks.held(job_id):
        held = ledger.operator_downtime(job_id)
        if held is None:
            return _made(dom, decision, job_id, ledger)
    fields = decision.event_fields() | {"done": False, "held_by": "operator"}
    log.info("policy.step", **fields, operator_downtime_ms=held)
    return False


def _made(dom: Domain, decision: Decision, job_id: str, ledger: Ledger) -> bool:
    try:
        if decision.action in DOWNTIME_STEPS:
            assert decision.downtime_ms is not None
            dom.migrateSetMaxDowntime(decision.downtime_ms)
        elif decision.action == "postcopy":
            dom.migrateStartPostCopy()
        elif decision.action == "suspend":
            ledger.note_finish_pause(job_id)  # a watch re-attached later stands down too
            dom.suspend()  # the guest resumes on arrival (unless --suspend asked otherwise)
        elif decision.action == "abort":
            dom.abortJob()
        # throttle: QEMU's auto-converge throttles by itself; none_left: nothing to do
    except LibvirtError as exc:
        refused = exc.get_error_message()
        log.warning("policy.step", **decision.event_fields(), done=False, error=refused)
        return False
    log.info("policy.step", **decision.event_fields(), done=True)
    return True


def _policy_switch(rt: Runtime, job: Job, dom: Domain, decision: Decision) -> bool:
    """The policy's switch to post-copy, unless this process has asked for one already (the
    operator's `drover postcopy` or force-complete): then it is said and not made, and the
    operator's switch stays the one asked (a failed second switch took its mark back)."""
    if switch_asked.asked(job.id):
        log.info("policy.step", **decision.event_fields(), done=False, held_by="operator")
        return False
    switch_asked.note(job.id)  # tells a pause before it from its own stop
    done = carry_out_step(dom, decision, job.id, rt.ledger)
    if done:
        rt.store.mark_postcopy(job.id)  # from now on an abort cannot be carried out
    else:
        switch_asked.forget(job.id)
    return done


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
    rt: Runtime,
    job: Job,
    dom: Domain,
    finished: threading.Event,
    *,
    policy: MigrationPolicy,
    until_idle: bool = False,
    events: CompletionWatch | None = None,
) -> Watched:
    """Report and steer the job's migration under its effective `policy` until `finished` is
    set (or, `until_idle`, until libvirt shows no migration job on `dom`). `events`: libvirt's
    events of this migration, where this process receives them (its passes' ends, the
    guest's pauses)."""
    spec, tunables = job.spec, rt.settings.tunables
    seen = Watched()

    def on_progress(p: Progress) -> None:
        if until_idle and not seen.reattached:
            seen.reattached = True
            log.info("migration.reattached")
        log.info("migration.progress", **p.as_event_fields())

    def on_decision(decision: Decision) -> bool:
        if decision.action == "abort":
            seen.abort_reason = decision.reason
        if decision.action != "postcopy":
            return carry_out_step(dom, decision, job.id, rt.ledger)
        with job_locks.held(job.id):  # not at once with the operator's switch
            return _policy_switch(rt, job, dom, decision)

    def on_action(action: Action) -> None:
        if action.kind == "cancel":
            seen.cancel_reason = action.reason
        elif action.kind == "abort":
            seen.abort_reason = action.reason
        done = carry_out(dom, action)
        if done is None and action.kind == "cancel":
            # Never heard by libvirt: not what stopped the migration, if anything does. The
            # request stays for the watch that follows the migration on a new connection
            # (worker/migration_carried_on.py), which carries it out.
            seen.cancel_reason = None
            log.warning("migration.abort_unheard", reason=action.reason)
        elif not done and action.kind == "cancel":
            # The operator's abort cannot be carried out (libvirt refuses to abort a post-copy
            # migration): the migration goes on, and the request is not left pending.
            rt.store.withdraw_abort(job.id)
            rt.ledger.withdraw_abort_asked(job.id)
            seen.cancel_reason = None
            log.warning("migration.abort_refused", reason=action.reason)

    monitor = MigrationMonitor(
        dom,
        interval=tunables.progress_interval,
        decision_interval=tunables.decision_interval,
        engine=ConvergenceEngine(policy, facts(dom).memory_mib, tunables.migration_timeout),
        on_progress=on_progress,
        on_action=on_action,
        on_decision=on_decision,
        # Whether the guest already runs on the destination: libvirt's word (the source
        # paused for post-copy), never the record's `postcopy_since`, which anyone with the
        # Redis password could set to stop the policy and the operator's abort.
        postcopy=state_reason(dom).in_postcopy,
        pass_ended=events.pass_ended if events is not None else None,
        paused=events.paused if events is not None else None,
        # Paused by this worker to finish (force-complete, the policy's suspend): its ledger.
        paused_to_finish=lambda: rt.ledger.finish_paused(job.id),
        # Read once per tick, never waiting out a Redis outage: libvirt migrates meanwhile.
        # This host's record of the operator's signed abort notice counts first: the
        # record's flag alone was anyone's to delete (worker/cancel_notice.py).
        abort_requested=lambda: abort_asked(rt, job.id),
        drain=lambda: drain_action(spec, rt.drained_for(), tunables.drain_timeout),
        until_idle=until_idle,
    )
    monitor.run(finished)
    seen.last = monitor.last
    seen.handed_over = monitor.handed_over.reason if monitor.handed_over else None
    return seen
