"""A job's lock (worker/job_locks.py) held by another thread, as a control libvirt has not
answered yet holds it, for as long as a test's block runs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from worker import job_locks

HOLD_S = 5.0


@contextmanager
def job_lock_held(job_id: str) -> Iterator[None]:
    """Another thread holds `job_id`'s lock from the block's start to its end."""
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with job_locks.held(job_id):
            inside.set()
            leave.wait(HOLD_S)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(HOLD_S), "the holder never took the lock"
    try:
        yield
    finally:
        leave.set()
        holder.join(HOLD_S)
