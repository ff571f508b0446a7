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
for each side: whichever comes second finds the other's. Kept in this process (the worker's
pool is threads: the tune and the migration's watch run in it), by job id, bounded like
worker/switch_asked.py: a figure libvirt was told, never read from Redis. A job has one
migration; its entry goes when the map is full.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import AbstractContextManager

from worker import job_locks

MAX_REMEMBERED = 1024

_lock = threading.Lock()  # over the map
_set: OrderedDict[str, int] = OrderedDict()


def setting(job_id: str) -> AbstractContextManager[None]:
    """Held around a max-downtime call to libvirt on `job_id`'s migration and the look at (or
    note of) the operator's: the job's lock (worker/job_locks.py)."""
    return job_locks.held(job_id)


def note(job_id: str, downtime_ms: int) -> None:
    """The operator's downtime for `job_id`, which libvirt has just taken (under `setting`)."""
    with _lock:
        _set[job_id] = downtime_ms
        _set.move_to_end(job_id)
        _bound(_set)


def by_operator(job_id: str) -> int | None:
    """The downtime the operator set on `job_id`'s migration, if any (under `setting`)."""
    with _lock:
        return _set.get(job_id)


def _bound(entries: OrderedDict[str, int]) -> None:
    while len(entries) > MAX_REMEMBERED:
        entries.popitem(last=False)
