"""The operator's switch of a running migration to post-copy (`drover postcopy`, and
`drover force-complete` where the policy allows it), ordered against the operator's abort.

Once switched, a migration cannot be aborted: the guest already runs on the destination. An
abort accepted a moment before a switch would then be refused by libvirt and the guest would
land all the same (a probe sent `drover abort` and, 0.1 s later, `drover postcopy`: the job
said "abort requested", then succeeded). So the switch is marked in the job's record, in one
step with a look at whether an abort is requested (jobs/record_marks.py), before libvirt is
asked; `drover abort` requests first and then looks at that mark (jobs/abort.py). Of the two
asked at once, at least one sees the other: the switch is refused while an abort is pending,
or the abort is refused as too late. The policy's own switch is guarded the same way by its
monitor (worker/monitor.py), which checks for an abort right before it.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from config.events import get_logger
from jobs.model import Job
from worker import switch_asked
from worker.cancel_notice import flagged_abort
from worker.libvirt_host import Domain, LibvirtError
from worker.phase_errors import PhaseFailed
from worker.runtime import Runtime

log = get_logger()


def refuse_if_aborting(rt: Runtime, job: Job, what: str) -> None:
    """PhaseFailed when the operator asked for the job's abort: it is being carried out, and
    `what` would contradict it (a force-complete's pause, reported as a finish)."""
    # This host's record of the operator's signed abort notice first: the record's flag
    # alone was anyone's to delete (worker/cancel_notice.py).
    asked = lambda: rt.ledger.abort_asked(job.id) or flagged_abort(rt, rt.store, job.id)  # noqa: E731
    _unless_aborting(asked, job, what, f"read whether job {job.id} is being aborted")


def operator_switch(rt: Runtime, job: Job, dom: Domain, what: str) -> None:
    """Switch the migration to post-copy unless an abort is requested (PhaseFailed). libvirt's
    refusal is raised as it came (LibvirtError), its mark taken back first."""

    def mark() -> str | None:
        noted = rt.ledger.abort_asked(job.id)
        flag = noted or rt.store.mark_postcopy_unless_aborting(job.id)
        if flag is not None and noted is None and flagged_abort(rt, rt.store, job.id) is None:
            # A flag no trusted key signed: nothing aborts the migration, and no switch is
            # made past it either (the flag and the mark are kept apart in one step).
            raise PhaseFailed(
                f"job {job.id}'s record carries an abort flag no trusted key signed: not "
                f"{what}; ask again once it is gone"
            )
        return flag

    _unless_aborting(mark, job, what, f"mark job {job.id} switching to post-copy")
    switch_asked.note(job.id)
    try:
        dom.migrateStartPostCopy()
    except LibvirtError:
        switch_asked.forget(job.id)
        rt.store.unmark_postcopy(job.id)
        raise
    log.info("migration.postcopy_started")


def _unless_aborting(ask: Callable[[], str | None], job: Job, what: str, cannot: str) -> None:
    """Run `ask` (the pending abort's reason, or None); PhaseFailed for an abort, or for
    Redis not answering (nothing is done to the guest on a guess)."""
    try:
        asked = ask()
    except redis.RedisError as exc:
        raise PhaseFailed(f"cannot {cannot}: {exc}") from None
    if asked is not None:
        raise PhaseFailed(
            f"job {job.id} is being aborted ({asked}): not {what}; its source aborts the "
            f"migration of {job.spec.domain}"
        )
