"""The ledger's records behind a host's own migration limits (`max_inbound`, `max_outbound`
of its entry in the registry): the guests this host is sending now, and the locks over each
limit's check. Admission keeps the limits with slots in Redis, which a Redis password can
delete or fill; the host's worker checks them again, against what no Redis write changes:
its ledger and its own libvirtd (worker/migration_limits.py).

A mixin of worker/ledger.py's Ledger (its connection, its lock, its schema, its directory).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

OUTBOUND_LOCK_FILE = "outbound.lock"  # held over a source's outbound check and its row


@dataclass(frozen=True)
class Sending:
    """A guest this host started sending: its job, its libvirt UUID, and when (epoch s)."""

    job_id: str
    uuid: str
    since: float


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`, on a descriptor of its own: exclusive between threads and
    between processes (a draining host runs two workers), released by the kernel if the
    worker dies."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class LimitRecords:
    _db: sqlite3.Connection
    _lock: threading.Lock
    _outbound: Path

    @contextmanager
    def outbound_held(self) -> Iterator[None]:
        """Held while the source counts the guests it is sending and adds one: two performs
        starting at once are never both counted before either is added."""
        with file_lock(self._outbound):
            yield

    def sending(self, excluding: str) -> list[Sending]:
        """The guests this host started sending for the other jobs, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, uuid, since FROM outbound WHERE job_id != ? ORDER BY since",
                (excluding,),
            ).fetchall()
        return [Sending(str(j), str(u), float(s)) for j, u, s in rows]

    def start_sending(self, job_id: str, uuid: str, since: float) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO outbound VALUES (?, ?, ?)", (job_id, uuid, since)
            )

    def stop_sending(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbound WHERE job_id = ?", (job_id,))

    def booked_jobs(self, excluding: str) -> list[tuple[str, int]]:
        """Every job other than `excluding` with memory booked here, and its MiB."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, mib FROM bookings WHERE job_id != ? ORDER BY job_id",
                (excluding,),
            ).fetchall()
        return [(str(job_id), int(mib)) for job_id, mib in rows]
