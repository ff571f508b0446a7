"""The policy a job's migration runs with, resolved on the source worker.

From this worker's own registry (its drover.toml), the domain's metadata in its own libvirtd
and the job's request, never from anything else in Redis (jobs/policy_choice.py). Recorded
on the job for `drover job` to show, with where each value came from.
"""

from __future__ import annotations

from config.policy_model import EffectivePolicy
from config.settings import ConfigError
from jobs.model import Job
from jobs.policy_choice import effective_policy
from worker.domain_metadata import policy_name
from worker.libvirt_host import Domain, is_paused
from worker.phase_errors import PhaseFailed
from worker.runtime import Runtime


def job_policy(rt: Runtime, job: Job, dom: Domain, *, starting: bool = False) -> EffectivePolicy:
    """The job's effective policy; PhaseFailed (one line) when it names an unknown policy.

    `starting`: before the migration call, when a paused guest rules post-copy out (libvirt
    refuses it); later the guest may be paused by the migration itself (post-copy, a suspend
    step), which changes nothing of the policy it was started with."""
    try:
        paused = starting and is_paused(dom)
        return effective_policy(rt.settings, job.spec, policy_name(dom), guest_paused=paused)
    except ConfigError as exc:
        raise PhaseFailed(f"migration policy: {exc}") from None


def resolve_and_record(rt: Runtime, job: Job, dom: Domain) -> EffectivePolicy:
    """`job_policy`, written on the job (replacing what an earlier attempt wrote)."""
    policy = job_policy(rt, job, dom, starting=True)
    rt.store.update(job.id, policy=policy)
    return policy
