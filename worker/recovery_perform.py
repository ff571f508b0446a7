"""Recovering an interrupted perform: re-attach to the migration libvirtd may still run,
watch it as perform would (worker/migration_watch.py: progress, the policy, the operator's
abort, post-copy, the drain, a Redis outage), then judge from libvirt where the guest is.

Peer-to-peer migrations keep running inside libvirtd while their worker is gone; managed
direct ones are aborted by libvirt with their client, so recovery finds the guest still on
the source (resumed if it was left paused) and the destination's rollback removes the paused
incoming copy.
"""

from __future__ import annotations

import threading

from config.events import get_logger
from jobs.model import Job
from jobs.phases import Phase
from jobs.states import JobState
from worker.completion import Landing, landing
from worker.job_end import fail_job
from worker.migration_watch import watch_migration
from worker.phase_source import job_domain, resume_if_left_paused
from worker.policy_source import job_policy
from worker.runtime import Runtime

log = get_logger()


def recover_perform(rt: Runtime, job: Job) -> bool:
    """Wait for a migration still running in libvirt, then judge where the guest is: True
    when it completed (the chain goes on), False when the job ended or was handed over."""
    spec = job.spec
    dom = job_domain(rt, job, spec.domain)
    cancelled = aborted = None
    if dom is not None:
        policy = job_policy(rt, job, dom).values
        seen = watch_migration(rt, job, dom, threading.Event(), policy=policy, until_idle=True)
        if seen.handed_over is not None:
            # The worker drains: libvirtd carries on, and the host's next worker recovers it.
            log.warning("phase.handed_over", reason=seen.handed_over)
            return False
        cancelled, aborted = seen.cancel_reason, seen.abort_reason
    dom = job_domain(rt, job, spec.domain)
    if dom is None or not dom.isActive() or (spec.offline and _defined_on_destination(rt, job)):
        rt.store.phase_ended(job.id, Phase.PERFORM.value)
        # No job-completed event was listened for: the destination's completed statistics.
        landed = Landing() if spec.offline else landing(rt, job, None)
        rt.store.update(job.id, result=landed.result_fields())
        log.info("migration.completed", recovered=True, **landed.event_fields())
        return True
    resume_if_left_paused(dom, job, "the interrupted migration left the guest paused")
    where = f"{spec.domain} still running on {rt.host}"
    if cancelled:
        reason = f"{cancelled}: migration aborted; {where}"
        rt.store.phase_ended(job.id, Phase.PERFORM.value, error=reason)
        fail_job(rt, job, Phase.PERFORM, reason, JobState.CANCELLED)
        return False
    away = f"did not complete while {rt.host}'s worker was away"
    why = f"was aborted: {aborted}" if aborted else away
    reason = f"the migration {why}; {where}"
    rt.store.phase_ended(job.id, Phase.PERFORM.value, error=reason)
    fail_job(rt, job, Phase.PERFORM, reason)  # which also rolls the destination back
    return False


def _defined_on_destination(rt: Runtime, job: Job) -> bool:
    peer_uri = rt.settings.host(job.spec.dst).peer_uri
    return rt.libvirt.on_peer(peer_uri, job.source.uuid) is not None
