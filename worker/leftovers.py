"""Finishing a destination's clean-up that could not be done when its job ended.

A rollback that cannot reach this host's libvirtd (a daemon restarting) gives up after its
tries (worker/rollback.py `rollback_reconnecting`). What it was to remove would then stay for
ever: the disk images this worker made for the job, and its record of the guest as incoming;
the next migration of that guest here fails ("... already exists"). This host's ledger still
lists both, so every `watchdog_interval` the rollback of each such job whose record says it
ended failed or cancelled is run again here, once this host's libvirtd answers, until the
ledger lists nothing for it.

Safe whatever the record says: a rollback removes only what the ledger lists and no domain
on this host names, and finish forgets a job's images once its guest has arrived.
"""

from __future__ import annotations

import structlog

from config.events import get_logger
from jobs.record import MalformedRecord
from jobs.store import JobNotFound, now
from worker.job_end import job_context
from worker.libvirt_host import LibvirtError, LibvirtUnavailable
from worker.phase_errors import PhaseFailed
from worker.rollback import ROLLBACK_STATES, rollback_destination
from worker.runtime import Runtime

log = get_logger()


def sweep_leftovers(rt: Runtime) -> None:
    """Run again the rollback of every ended job this host's ledger still holds something
    for (one try each pass; a job whose record cannot be read, or that is still live or
    succeeded, is left as it is; so is one that ended less than `redispatch_after` ago,
    whose own rollback may still be on its way). One job's failure is that job's: only a
    libvirtd that cannot be reached ends the pass."""
    pending = rt.ledger.jobs_with_leftovers()
    if not pending or not rt.libvirt_answers():
        return
    for job_id in pending:
        try:
            job = rt.store.get(job_id)
        except (JobNotFound, MalformedRecord):
            continue
        if job.state not in ROLLBACK_STATES or job.spec.dst != rt.host:
            continue
        if (now() - job.updated).total_seconds() < rt.settings.tunables.redispatch_after:
            continue  # its own rollback, sent as it ended, may still be on its way
        with structlog.contextvars.bound_contextvars(**job_context(job, "rollback")):
            log.info("rollback.resumed", reason="its rollback did not finish when the job ended")
            try:
                rollback_destination(rt, job)
            except PhaseFailed as exc:  # libvirt shows the guest still coming in: next pass
                log.warning("rollback.refused", reason=exc.reason)
                continue
            except LibvirtUnavailable as exc:  # the daemon is gone: every job's next pass
                rt.libvirt.reset()
                log.warning("rollback.retrying", reason=str(exc), attempt=1, of=1)
                return
            except LibvirtError as exc:
                # This job's own error (ids come in one order, every pass): the jobs after it
                # still get their pass; a lost connection is opened again for them.
                rt.libvirt.reset()
                log.warning("rollback.retrying", reason=str(exc), attempt=1, of=1)
                continue
