"""The maximum downtime the operator set on a job's running migration (`drover tune
--max-downtime`), which the policy's own downtime steps then leave standing.

Why: the policy sets its allowed downtime when the transfer begins and raises it on its
schedule (worker/convergence.py). An operator's tune made a moment before the policy's first
step was overwritten by it (a probe saw it once in twelve tries), and any later raise would
undo the operator's choice as well. An operator who sets the downtime by hand has taken it
out of the policy's hands for that migration, as an operator's `virsh migrate-setmaxdowntime`
would expect: the policy's later downtime steps are said (`policy.step`, done false,
`held_by` operator) and not made; its other steps (post-copy, suspend, abort) go on.

Every max-downtime call to libvirt on a job's migration, the policy's and the operator's, is
made under that job's lock (worker/job_locks.py), so that the check and the call are one step
for each side: whichever comes second finds the other's. The figure is kept in this host's
ledger (worker/ledger_operator.py), not in the worker's memory: a probe restarted the worker
mid-migration and the re-attached watch's policy raised the downtime again from 777 ms to
9 s. A figure libvirt was told, never read from Redis.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from worker import job_locks
from worker.ledger import Ledger


def setting(job_id: str) -> AbstractContextManager[None]:
    """Held around a max-downtime call to libvirt on `job_id`'s migration and the look at (or
    note of) the operator's: the job's lock (worker/job_locks.py)."""
    return job_locks.held(job_id)


def note(ledger: Ledger, job_id: str, downtime_ms: int) -> None:
    """The operator's downtime for `job_id`, which libvirt has just taken (under `setting`)."""
    ledger.note_operator_downtime(job_id, downtime_ms)


def by_operator(ledger: Ledger, job_id: str) -> int | None:
    """The downtime the operator set on `job_id`'s migration, if any (under `setting`)."""
    return ledger.operator_downtime(job_id)
