"""Recovering an interrupted perform: re-attach to the migration libvirtd may still run,
watch it as perform would (worker/migration_watch.py: progress, the policy, the operator's
abort, post-copy, the drain, a Redis outage), then judge from libvirt where the guest is.

Peer-to-peer migrations keep running inside libvirtd while their worker is gone; managed
direct ones are aborted by libvirt with their client, so recovery finds the guest still on
the source (resumed if it was left paused) and the destination's rollback removes the paused
incoming copy. A post-copy that failed (before or while the worker was away) is resumed
as perform would (worker/postcopy_recovery.py), never resumed as a paused guest.
"""

from __future__ import annotations

import contextlib
import threading

from config.events import get_logger
from config.policy_model import MigrationPolicy
from jobs.model import Job
from jobs.phases import Phase
from jobs.states import JobState
from worker.completion import Landing, landing
from worker.job_end import fail_job
from worker.libvirt_host import Domain, LibvirtError
from worker.libvirt_states import state_reason
from worker.migration_call import build_call
from worker.migration_watch import Watched, watch_migration
from worker.phase_destination import handoff_or_fail
from worker.phase_source import guest_uuid, job_domain, resume_if_left_paused, still_here
from worker.policy_source import job_policy
from worker.postcopy_recovery import (
    ANSWER_WITHIN_S,
    PostcopyLost,
    check_paused,
    recover_failed_postcopy,
    resume_until_landed,
)
from worker.postcopy_whereabouts import locate
from worker.runtime import Runtime

log = get_logger()


def recover_perform(rt: Runtime, job: Job) -> bool:
    """Wait for a migration still running in libvirt, then judge where the guest is: True
    when it completed (the chain goes on), False when the job ended or was handed over.
    A post-copy libvirt shows beyond resume fails the job, as in perform."""
    try:
        return _recover_perform(rt, job)
    except PostcopyLost as exc:
        rt.store.phase_ended(job.id, Phase.PERFORM.value, error=exc.reason)
        fail_job(rt, job, Phase.PERFORM, exc.reason)  # which also rolls the destination back
        return False


def _recover_perform(rt: Runtime, job: Job) -> bool:
    spec = job.spec
    if job.state is JobState.POSTCOPY_PAUSED:  # drover gave up: has someone resumed it?
        return check_paused(rt, job) and _completed(rt, job)
    dom = job_domain(rt, job, spec.domain)
    cancelled = aborted = None
    if dom is not None and not _postcopy_broke(dom, job):
        policy = job_policy(rt, job, dom).values
        seen = watch_until_idle(rt, job, dom, policy)
        if seen.handed_over is not None:
            # The worker drains: libvirtd carries on, and the host's next worker recovers it.
            log.warning("phase.handed_over", reason=seen.handed_over)
            return False
        cancelled, aborted = seen.cancel_reason, seen.abort_reason
    if _recovered_postcopy(rt, job):
        return _completed(rt, job)
    dom = job_domain(rt, job, spec.domain)
    if dom is None or _moved(rt, job, dom):
        return _completed(rt, job)
    resume_if_left_paused(rt, dom, job, "the interrupted migration left the guest paused")
    where = still_here(dom, spec.domain, rt.host)
    if cancelled:
        reason = f"{cancelled}: migration aborted; {where}"
        rt.store.phase_ended(job.id, Phase.PERFORM.value, error=reason)
        fail_job(rt, job, Phase.PERFORM, reason, JobState.CANCELLED)
        return False
    away = f"did not complete while {rt.host}'s worker could not follow it"
    why = f"was aborted: {aborted}" if aborted else away
    reason = f"the migration {why}; {where}"
    rt.store.phase_ended(job.id, Phase.PERFORM.value, error=reason)
    fail_job(rt, job, Phase.PERFORM, reason)  # which also rolls the destination back
    return False


def _moved(rt: Runtime, job: Job, dom: Domain) -> bool:
    """Whether libvirt moved the guest, the source still defining it: a live guest no longer
    running here left; an offline one is a definition copied, shut off here before and after,
    so only the destination's word counts (its guest being shut off here said it had moved,
    and a job whose move never happened, or had not yet, went on to finish and failed there
    while libvirt then defined it on the destination: fault probe)."""
    if job.spec.offline:
        return _defined_on_destination(rt, job)
    return not dom.isActive()


def _defined_on_destination(rt: Runtime, job: Job) -> bool:
    """The destination's libvirtd's word on an offline move's definition. One that cannot
    be reached raises LibvirtUnavailable (the next recovery asks again): taken as "not
    there", it would fail the job, and roll it back, on hearsay."""
    peer_uri = rt.settings.host(job.spec.dst).peer_uri
    with rt.libvirt.peer_domain(peer_uri, job.spec.arrives_as) as there:
        return there is not None and there.UUIDString() == guest_uuid(rt, job)


def _completed(rt: Runtime, job: Job) -> bool:
    rt.store.phase_ended(job.id, Phase.PERFORM.value)
    # No job-completed event was listened for: the destination's completed statistics.
    landed = Landing() if job.spec.offline else landing(rt, job, None)
    rt.store.update(job.id, result=landed.result_fields())
    log.info("migration.completed", recovered=True, **landed.event_fields())
    return True


def watch_until_idle(rt: Runtime, job: Job, dom: Domain, policy: MigrationPolicy) -> Watched:
    """Watch a migration this call did not start until libvirt shows no job on `dom`, or its
    post-copy breaks (a failed post-copy stays listed as a job: nothing left to watch but a
    migration to resume, which the post-copy recovery does once the watch ends)."""
    broke = until_postcopy_breaks(rt, dom)
    try:
        return watch_migration(rt, job, dom, broke, policy=policy, until_idle=True)
    finally:
        broke.set()


def until_postcopy_breaks(rt: Runtime, dom: Domain) -> threading.Event:
    """An event set once libvirt shows the re-attached migration's post-copy failed (a job
    libvirt may still list then, with nothing left to watch but a migration to resume)."""
    broke = threading.Event()

    def look() -> None:
        while not broke.wait(rt.settings.tunables.progress_interval):
            with contextlib.suppress(LibvirtError):
                if state_reason(dom).postcopy_failed:
                    broke.set()

    threading.Thread(target=look, name="postcopy-look", daemon=True).start()
    return broke


def _postcopy_broke(dom: Domain, job: Job) -> bool:
    """A post-copy that failed while the worker was away (or was being recovered): there is
    no migration to watch, only one to resume. The record's `postcopy_recovering` counts
    only while libvirt shows the guest in a post-copy: written into Redis over a pre-copy,
    it would otherwise keep recovery from watching (and the policy from steering) a
    migration libvirtd still runs."""
    found = state_reason(dom)
    return found.postcopy_failed or (
        job.state is JobState.POSTCOPY_RECOVERING and found.in_postcopy
    )


def _recovered_postcopy(rt: Runtime, job: Job) -> bool:
    """Resume a failed post-copy as perform would (worker/postcopy_recovery.py), with the
    call perform made: rebuilt from the spec, this worker's registry and the domain's
    policy. False when libvirt shows no post-copy to recover."""
    job = rt.store.get(job.id)
    dom = job_domain(rt, job, job.spec.domain)
    if dom is None and job.state is not JobState.POSTCOPY_RECOVERING:
        return False
    # The policy from this worker's registry and libvirtd, never the copy recorded in Redis;
    # with the source's domain gone there is nothing to resume from (the whereabouts decide).
    values = job_policy(rt, job, dom).values if dom is not None else MigrationPolicy()
    call = build_call(job.spec, handoff_or_fail(rt, job.spec), values)
    if job.state is JobState.POSTCOPY_RECOVERING:
        contradiction = _no_postcopy_seen(rt, job)
        if contradiction is not None:
            log.warning("postcopy.not_found", reason=contradiction)
            return False
        log.warning("postcopy.resuming_again", reason="the worker recovering it was restarted")
        return resume_until_landed(rt, job, call)
    return recover_failed_postcopy(rt, job, call, f"{rt.host}'s worker was away")


def _no_postcopy_seen(rt: Runtime, job: Job) -> str | None:
    """Why libvirt contradicts a record that says a post-copy is being recovered (None: it
    does not). Believed while either host shows the guest in a post-copy or landed, or
    while libvirt cannot tell (no source copy, destination silent); else the job is judged
    from libvirt as any interrupted perform is, not kept waiting for a post-copy that is not
    there until `postcopy_recovery_timeout` says `postcopy_paused` of a guest that runs."""
    seen = locate(rt, job, ANSWER_WITHIN_S)
    if seen.in_postcopy or seen.landed or (seen.source is None and not seen.reachable):
        return None
    return f"the job says post-copy recovering, but libvirt shows no post-copy: {seen.describe()}"
