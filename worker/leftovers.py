"""Finishing a destination's clean-up that could not be done when its job ended.

A rollback that cannot reach this host's libvirtd (a daemon restarting) gives up after its
tries (worker/rollback.py `rollback_reconnecting`). What it was to remove would then stay for
ever: the disk images this worker made for the job, and its record of the guest as incoming;
the next migration of that guest here fails ("... already exists"). This host's ledger still
lists both, so every `watchdog_interval` the rollback of each such job whose record says it
ended failed or cancelled is run again here, once this host's libvirtd answers, until the
ledger lists nothing for it.

Safe whatever the record says: a rollback removes only what the ledger lists and no domain
on this host names, and finish forgets a job's images once its guest has arrived. A job whose
guest arrived here all the same (its end written by hand mid-migration) is not rolled back:
dropping its ledger rows would leave nothing to take it back up by (attacker probe); it is
taken back up here as its finish would (worker/contradicted_end.py). An end that needs this
host's finish (succeeded, checked) recorded for a job whose finish never ran here is rolled
back as a failed one: its booking held this host's room for good (attacker probe).
"""

from __future__ import annotations

import structlog

from config.events import get_logger
from jobs.keys import job_key
from jobs.model import Job
from jobs.phases import Phase
from jobs.record import MalformedRecord
from jobs.record_read import REDIS_OUTAGES
from jobs.store import JobNotFound, now
from worker.contradicted_end import arrived_here, reopened
from worker.job_end import job_context
from worker.libvirt_host import LibvirtError, LibvirtUnavailable
from worker.libvirt_states import paused_by_user, state_reason
from worker.phase_errors import PhaseFailed
from worker.rollback import ended_without_moving, rollback_destination
from worker.runtime import Runtime

log = get_logger()
_ARRIVED = (
    "{job.spec.arrives_as} runs on {rt.host}, arrived, brought in by this job: its record's "
    "end is not libvirt's; nothing of it is rolled back, and it is not taken back up (its "
    "request is not signed, or its record changed meanwhile)"
)
# Jobs whose arrival this process has said it will not roll back, and jobs whose rollback
# it has said is refused (a copy still coming in): each said once, not at every pass (an
# attacker probe counted two lines a pass for a minute). Bounded: job ids are anyone's.
_said_arrived: set[str] = set()
_said_refused: set[str] = set()
_SAID_MAX = 4096


def _note(said: set[str], job_id: str) -> None:
    if len(said) >= _SAID_MAX:
        said.clear()
    said.add(job_id)


def sweep_leftovers(rt: Runtime) -> None:
    """Run again the rollback of every ended job this host's ledger still holds something
    for (one try each pass; a job whose record cannot be read, or that is still live or
    succeeded, is left as it is; so is one that ended less than `redispatch_after` ago,
    whose own rollback may still be on its way). One job's failure is that job's: its bad
    data, a bug or libvirt's error for it is said and passed over, so that it cannot starve
    the jobs after it pass after pass; only a libvirtd that cannot be reached ends the pass."""
    pending = rt.ledger.jobs_with_leftovers()
    if not pending or not rt.libvirt_answers():
        return
    for job_id in pending:
        try:
            if not _sweep_one(rt, job_id):
                return  # libvirtd stopped answering: the next pass
        except REDIS_OUTAGES:
            raise
        except Exception as exc:
            log.exception("keeper.error", duty="leftovers", key=job_key(job_id), error=str(exc))


def _sweep_one(rt: Runtime, job_id: str) -> bool:
    """One job's rollback run again, if it is due; False when libvirtd could not be reached."""
    try:
        job = rt.store.get(job_id)
    except (JobNotFound, MalformedRecord):
        return True
    if job.spec.dst != rt.host or not ended_without_moving(rt, job):
        return True
    if (now() - job.updated).total_seconds() < rt.settings.tunables.redispatch_after:
        return True  # its own rollback, sent as it ended, may still be on its way
    with structlog.contextvars.bound_contextvars(**job_context(job, "rollback")):
        if _running_here(rt, job) and arrived_here(rt, job):  # taken back up instead
            if reopened(rt, job, Phase.FINISH) is None and job_id not in _said_arrived:
                _note(_said_arrived, job_id)  # once: it stays so until someone acts
                log.warning("rollback.refused", reason=_ARRIVED.format(rt=rt, job=job))
            return True
        said = job_id in _said_refused  # a refusal stands pass after pass: said once
        if not said:
            log.info("rollback.resumed", reason="its rollback did not finish when the job ended")
        try:
            rollback_destination(rt, job)
        except PhaseFailed as exc:  # libvirt shows the guest still coming in: next pass
            if not said:
                _note(_said_refused, job_id)
                log.warning("rollback.refused", reason=exc.reason)
        except LibvirtUnavailable as exc:  # the daemon is gone: every job's next pass
            rt.libvirt.reset()
            log.warning("rollback.retrying", reason=str(exc), attempt=1, of=1)
            return False
        except LibvirtError as exc:  # this job's own (a lost connection is opened again)
            rt.libvirt.reset()
            log.warning("rollback.retrying", reason=str(exc), attempt=1, of=1)
    return True


def _running_here(rt: Runtime, job: Job) -> bool:
    """libvirt here shows the guest this job brought in as a guest that arrived: running, or
    paused on request (`--suspend`, or a guest paused at its source, lands paused: an attacker
    probe had such an arrival rolled back), not in a post-copy. Only then is its arrival asked
    about. A copy still coming in (paused by its migration, or in a post-copy) is the
    rollback's to judge, which refuses while it comes in; asking it for its migration job as
    well would wait twice on a busy libvirtd (make test: 60 s)."""
    uuid = rt.ledger.incoming_uuid(job.id)
    try:
        dom = None if uuid is None else rt.libvirt.by_uuid(uuid)
        found = None if dom is None or not dom.isActive() else state_reason(dom)
    except LibvirtError:
        return False
    if found is None or found.in_postcopy:
        return False
    return found.running or paused_by_user(found)
