"""A job whose record says it ended while libvirt shows its guest arrived: taken back up.

The record's state is a Redis write like any other: anyone with a Redis password can write
`cancelled` or `failed` into a job while its source's perform migrates the guest. libvirt
goes on, the guest lands, and the job's finish and confirm, seeing an ended record, would
stop: the record would say the guest never moved, and nothing would verify where it runs.

No drover step ends a job that way: a job drover fails or cancels before the migration is
never migrated (perform moves only a live job), one that fails after it is ended by its
finish or confirm, and a rolled-back one has lost its copy here. So when finish's message
comes for a job whose record says it ended (failed, cancelled, rolled back; or succeeded or
checked, which no drover step enters before finish), and this host's own
records and libvirtd say otherwise (it prepared the job, has not run its finish, and its
libvirtd runs the guest the job brought in, arrived), the record is taken back to
`finishing`: finish and confirm then run as always and the job ends as libvirt shows it.
"""

from __future__ import annotations

from config.events import get_logger
from jobs.model import Job
from jobs.phases import Phase
from jobs.request_signing import RequestRefused, check_job, verifier_for
from jobs.states import JobState
from worker.libvirt_host import LibvirtError
from worker.rollback import incoming_job
from worker.runtime import Runtime

log = get_logger()
# Ends that a guest arrived here, with this host's finish not run, contradicts: drover enters
# succeeded only after finish (which this host's ledger would show) and checked only for a dry
# run (which prepares nothing); a probe wrote either mid-migration.
CONTRADICTED = frozenset(
    {
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.ROLLED_BACK,
        JobState.SUCCEEDED,
        JobState.CHECKED,
    }
)


def reopened(rt: Runtime, job: Job, phase: Phase) -> Job | None:
    """The job taken back to `finishing` (its record read again), or None: its end stands."""
    if phase is not Phase.FINISH or job.state not in CONTRADICTED:
        return None
    if not arrived_here(rt, job) or not _signed(rt, job):
        return None
    spec = job.spec
    reason = (
        f"the record said {job.state.value}, but {spec.arrives_as} runs on {rt.host}, "
        "brought in by this job: no drover step ended it so"
    )
    if not rt.store.reopen(job.id, job.state, JobState.FINISHING, host=rt.host, reason=reason):
        return None  # its record changed meanwhile: judged again on the next message
    log.warning("job.reopened", reason=reason, previous=job.state.value)
    return rt.store.get(job.id)


def _signed(rt: Runtime, job: Job) -> bool:
    """The record's request is one a trusted key signed (as every phase checks next): an
    unsigned record is never taken back up, whatever this host holds for its id."""
    try:
        check_job(verifier_for(rt.settings.security), job)
    except RequestRefused:
        return False
    return True


def arrived_here(rt: Runtime, job: Job) -> bool:
    """This host prepared the job and has not run its finish, and its libvirtd runs the guest
    the job brought in (this host's ledger names it), with no migration going on."""
    if not rt.ledger.claimed(job.id, Phase.DESTINATION_PREPARE.value):
        return False
    if rt.ledger.claimed(job.id, Phase.FINISH.value):
        return False
    uuid = rt.ledger.incoming_uuid(job.id)
    try:
        dom = None if uuid is None else rt.libvirt.by_uuid(uuid)
        return dom is not None and bool(dom.isActive()) and not incoming_job(dom)
    except LibvirtError:  # no answer: the end stands (its next message asks again)
        return False
