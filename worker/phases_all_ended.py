"""A live job whose every phase has ended: its state was written by hand, and libvirt says
how it ended.

drover enters a job's end in the same write that ends its last phase (worker/phase_frame.py),
so no drover step leaves a job live with confirm ended. A Redis write can: a probe wrote
`postcopy_paused` into an ordinary pre-copy job mid-migration; finish and confirm then
skipped (neither may leave a post-copy state), and the job stayed live for good, holding
its guest's lease: no new migration of the guest, no abort ("finishing"), an evacuation
running for ever. Recovery found no step left to run and looked no further.

Now the confirm's host (the source) takes such a job to `succeeded` when libvirt on both
hosts shows the move done: the guest running on the destination only (`Whereabouts.landed`).
Anything else is left as it is and said (`job.contradicted`): there is no libvirt fact to
end it by, and nothing is done to a guest on the word of a record.
"""

from __future__ import annotations

import structlog

from config.events import get_logger
from jobs.model import Job
from jobs.phases import Phase
from jobs.states import JobState
from worker.job_end import job_context, job_ended
from worker.libvirt_host import LibvirtError, LibvirtUnavailable
from worker.postcopy_recovery import ANSWER_WITHIN_S
from worker.postcopy_whereabouts import locate
from worker.runtime import Runtime

log = get_logger()


def settle(rt: Runtime, job: Job) -> None:
    """End a live job whose phases have all ended as libvirt shows it ended (see module)."""
    confirm = job.phases.get(Phase.CONFIRM.value)
    if rt.host != job.spec.src or confirm is None or confirm.ended is None:
        return
    with structlog.contextvars.bound_contextvars(**job_context(job, Phase.CONFIRM.value)):
        _settle(rt, job)


def _settle(rt: Runtime, job: Job) -> None:
    try:
        seen = locate(rt, job, ANSWER_WITHIN_S)
    except (LibvirtError, LibvirtUnavailable):
        return  # asked again at the next pass
    if not seen.landed:
        log.warning(
            "job.contradicted",
            reason=f"every phase ended but the record says {job.state.value}; libvirt "
            f"shows {seen.describe()}: left as it is",
        )
        return
    reason = (
        f"every phase ended and libvirt shows {seen.describe()}, but the record said "
        f"{job.state.value}: no drover step leaves a job so"
    )
    if not rt.store.reopen(job.id, job.state, JobState.FINISHING, host=rt.host, reason=reason):
        return  # its record changed meanwhile: judged again at the next pass
    log.warning("job.reopened", reason=reason, previous=job.state.value)
    moved, _ = rt.store.transition(job.id, JobState.SUCCEEDED, host=rt.host)
    if moved:
        log.info("job.state", state=JobState.SUCCEEDED.value, previous=JobState.FINISHING.value)
        job_ended(rt, job)
