"""Where this host's ledger and a job's record in Redis disagree about a phase: the ledger
wins (only root writes it; anyone with the Redis password can rewrite the record), the job
is left as it is, and the disagreement is said once per step."""

from __future__ import annotations

from config.events import get_logger
from jobs.model import Job
from jobs.phases import Phase
from worker.ledger import PhaseMark
from worker.runtime import Runtime

log = get_logger()


def ended_here(rt: Runtime, job: Job, phase: Phase) -> bool:
    """Whether this host's ledger says `phase` ended here although the record shows it
    interrupted: the record was rewritten (a finished job made to look mid-flight), and
    settling the phase again would act on the host (resume a guest, migrate it again).
    The ledger wins; the job is left as it is, and this is said once."""
    if not rt.ledger.marked(job.id, phase.value, PhaseMark.ENDED):
        return False
    _contradiction(rt, job.id, phase, "is still running", "ended here")
    return True


def started_here(rt: Runtime, job_id: str, phase: Phase) -> bool:
    """Whether this host's ledger says `phase` started here although the record shows it
    never did: it is not sent again, nor its claim given back (it would run twice)."""
    if not rt.ledger.marked(job_id, phase.value, PhaseMark.STARTED):
        return False
    _contradiction(rt, job_id, phase, "never started", "started here")
    return True


def given_up_here(rt: Runtime, job: Job, phase: Phase) -> bool:
    """Whether this host's ledger says the job's next step cannot run here, so that it is never
    sent again: `confirm` on a source where the job's migration failed (the guest found still
    here); `finish` on a destination where the job's guest no longer comes in for it: prepare
    looked at the guest here (its facts are kept), and the incoming record prepare took is
    gone, which only the job's rollback or its own finish removes (a finish that started is
    recovered, never sent again).

    Probe: a job that failed in perform, rolled back here, written back to `migrating` in
    Redis, had its finish sent again by this host's recovery; it verified the guest another
    job had brought in since, and the job "succeeded". A host that lost its ledger has no
    word (no facts): the record's step is sent as before."""
    if phase is Phase.CONFIRM and rt.ledger.marked(job.id, Phase.PERFORM.value, PhaseMark.FAILED):
        # The source's own word: its migration failed with the guest still here. A record
        # that says finish ended since (written so) would have confirm say the job succeeded.
        _contradiction(rt, job.id, phase, "is due", "cannot run: the job's migration failed here")
        return True
    if phase is not Phase.FINISH or rt.ledger.facts(job.id) is None:
        return False
    if rt.ledger.incoming_uuid(job.id) is not None:
        return False
    _contradiction(
        rt, job.id, phase, "is due", "cannot run: the job's incoming guest was given up here"
    )
    return True


def _contradiction(
    rt: Runtime, job_id: str, phase: Phase, record_says: str, ledger_says: str
) -> None:
    noted = (job_id, phase.value)
    if noted not in rt.noted_contradictions:
        rt.noted_contradictions.add(noted)
        log.error(
            "phase.not_recovered",
            reason=f"the job record says {phase.value} {record_says}, but this host's ledger "
            f"says it {ledger_says}: the record was changed behind drover's back (or lost); "
            "nothing is done for it",
        )
