"""One lock per job, in this process, around what the worker asks libvirt to change in a job's
running migration: the policy's downtime steps, the operator's tune, switch to post-copy and
force-complete.

Why: each of those looks at the migration (libvirt's state, what this process already asked)
and then acts; two of them at once on the same job each saw the migration as it was before the
other acted. A tune made as the policy set its first downtime was overwritten by it (probe F3,
worker/migration_watch.py carry_out_step), and two force-completes asked together were both answered
"switched". Under the job's lock the look and the act are one step. One lock per job: a
libvirtd slow to answer for one migration never holds up another's. Reentrant: the operator's
tune sets its downtime under the lock it already holds.

The worker's pool is threads (config/celery.py), so the control tasks and the migration's
watch of one host all run in its one process. At most MAX_KEPT locks are kept, the least
recently used one not held going first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

MAX_KEPT = 1024

_guard = threading.Lock()  # over the map; held for no call to libvirt
_locks: OrderedDict[str, _Held] = OrderedDict()


class _Held:
    """A job's lock and how many threads hold it or wait for it (never evicted then)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.users = 0


class JobBusy(Exception):
    """The job's lock was not free within the wait asked for."""


@contextmanager
def held(job_id: str, wait_s: float | None = None) -> Iterator[None]:
    """Hold `job_id`'s lock for the block; `wait_s`: wait at most that long for it, else
    JobBusy (None: as long as it takes, as the migration's own watch does)."""
    with _guard:
        entry = _locks.get(job_id)
        if entry is None:
            entry = _locks[job_id] = _Held()
        _locks.move_to_end(job_id)
        entry.users += 1
        _evict()
    try:
        if not entry.lock.acquire(timeout=-1 if wait_s is None else wait_s):
            raise JobBusy(job_id)
        try:
            yield
        finally:
            entry.lock.release()
    finally:
        with _guard:
            entry.users -= 1


def _evict() -> None:
    excess = len(_locks) - MAX_KEPT
    if excess > 0:
        for job_id in [j for j, e in _locks.items() if e.users == 0][:excess]:
            del _locks[job_id]
