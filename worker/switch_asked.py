"""When this worker asked libvirt to switch a job's migration to post-copy: the policy's step
(worker/migration_watch.py) or the operator's (worker/postcopy_switch.py), in this process.

It tells a pause of the guest before the switch from the switch's own stop. libvirt announces
both as the guest suspended by its migration; the switch's own stop comes 7 to 25 ms before
libvirt announces post-copy, longer than libvirt's whole post-copy downtime (2 to 5 ms): a
probe of the lab saw an ordinary switch reported as "paused before the switch" nine times out
of sixteen when the two were told apart by length. A pause libvirt announced before drover
asked for the switch is one; any other is the switch's own (worker/completion.py).

Kept in memory, by the process's monotonic clock, where the migration's watch reads it: a
figure for people, never written in Redis. A switch made by hand (`virsh migrate-postcopy`) or
by another process is not known here, and the job then reports libvirt's downtime alone.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

# Jobs remembered at most: one entry per switch, taken when the job's migration lands; a job
# whose perform never gets there must not make the map grow for good.
MAX_REMEMBERED = 1024

_lock = threading.Lock()
_asked: OrderedDict[str, float] = OrderedDict()


def note(job_id: str) -> None:
    """The switch of `job_id`'s migration is being asked of libvirt now (the first ask counts)."""
    with _lock:
        _asked.setdefault(job_id, time.monotonic())
        while len(_asked) > MAX_REMEMBERED:
            _asked.popitem(last=False)


def forget(job_id: str) -> None:
    """A switch libvirt refused: nothing was switched."""
    with _lock:
        _asked.pop(job_id, None)


def asked(job_id: str) -> bool:
    """Whether this process has asked libvirt to switch `job_id`'s migration (and libvirt has
    not refused it): a second switch asked now is no switch."""
    with _lock:
        return job_id in _asked


def taken(job_id: str) -> float | None:
    """When the switch of `job_id` was asked (None: not by this process), forgotten after."""
    with _lock:
        return _asked.pop(job_id, None)
