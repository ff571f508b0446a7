"""The worker's own records on its host: what it made, and which phases it has run.

Redis tells a worker which job to work on, never what to do to its host, so what a worker
must remember in order to undo its own work lives here, on the host, where only root can
write (the registry's `state_dir`, mode 0700):

- the disk images it created for a job: a rollback removes exactly these, never a path read
  from a job record;
- the phases it has run for a job: a phase runs once per job on this host, even if someone
  with the Redis password deletes the claims in Redis and sends it again; and whether each
  started and ended here, so that recovery never gives back the claim of a phase that
  started, nor settles again one that ended, whatever the job record was rewritten to say;
- the guest as this host's own libvirt calls showed it before the migration: whether to
  resume a guest left paused, and what it must look like on arrival, are never read from
  the job record;
- which job is bringing a domain (by UUID) in: a second job's prepare for it is refused, and
  a rollback destroys an incoming copy only if it is its own job's;
- the memory this host booked for each guest it is bringing in, counted by the room check
  beside the bookings in Redis (deleted or lowered there by hand, they let nobody in);
- which of a schedule's signed times this host has already started an evacuation for, and
  which schedules were removed: an entry written back into Redis fires nothing here;
- how often each evacuation of this host queued a domain again (`evacuation_retries`), that
  the host was seen disabled for maintenance, and the maximum downtime an operator set on a
  job's migration out of here (worker/ledger_operator.py).

SQLite (the standard library's), one small file, one connection shared by the worker's
threads behind a lock; durable across the worker's crashes, not the host's (why: the
constructor).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

from pydantic import ValidationError

from jobs.record import SourceFacts
from worker.ledger_limits import OUTBOUND_LOCK_FILE, LimitRecords, file_lock
from worker.ledger_operator import OperatorRecords

LEDGER_FILE = "ledger.sqlite3"
ROOM_LOCK_FILE = "room.lock"  # held over a destination's room check and booking
DIR_MODE = 0o700
FILE_MODE = 0o600
_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (job_id TEXT NOT NULL, path TEXT NOT NULL,
                                   PRIMARY KEY (job_id, path));
CREATE TABLE IF NOT EXISTS claims (job_id TEXT NOT NULL, phase TEXT NOT NULL,
                                   PRIMARY KEY (job_id, phase));
CREATE TABLE IF NOT EXISTS incoming (uuid TEXT PRIMARY KEY, job_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS phase_marks (job_id TEXT NOT NULL, phase TEXT NOT NULL,
                                        mark TEXT NOT NULL, PRIMARY KEY (job_id, phase, mark));
CREATE TABLE IF NOT EXISTS guest_facts (job_id TEXT PRIMARY KEY, facts TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bookings (job_id TEXT PRIMARY KEY, mib INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS fired (schedule_id TEXT NOT NULL, slot TEXT NOT NULL,
                                  PRIMARY KEY (schedule_id, slot));
CREATE TABLE IF NOT EXISTS removed_schedules (schedule_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS retries (evacuation_id TEXT NOT NULL, domain TEXT NOT NULL,
                                    taken INTEGER NOT NULL, PRIMARY KEY (evacuation_id, domain));
CREATE TABLE IF NOT EXISTS maintenance (host TEXT PRIMARY KEY, seen TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbound (job_id TEXT PRIMARY KEY, uuid TEXT NOT NULL,
                                     since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS operator_downtime (job_id TEXT PRIMARY KEY, ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS finish_pauses (job_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS cancelled (job_id TEXT PRIMARY KEY, by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS abort_asked (job_id TEXT PRIMARY KEY, reason TEXT NOT NULL);
"""


class PhaseMark(StrEnum):
    STARTED = "started"  # its body was about to run here
    ENDED = "ended"  # it ended here, whatever its outcome
    # perform only: libvirt's migration failed and the guest was found still here (its move
    # did not happen, whatever the record says later: worker/ledger_word.py)
    FAILED = "failed"


class LedgerError(Exception):
    """The ledger cannot be opened; the message is one line."""


class Ledger(OperatorRecords, LimitRecords):
    def __init__(self, directory: str) -> None:
        base = Path(directory)
        try:
            base.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            base.chmod(DIR_MODE)
            path = base / LEDGER_FILE
            path.touch(mode=FILE_MODE, exist_ok=True)
            path.chmod(FILE_MODE)
            self._room = base / ROOM_LOCK_FILE
            self._room.touch(mode=FILE_MODE, exist_ok=True)
            self._outbound = base / OUTBOUND_LOCK_FILE
            self._outbound.touch(mode=FILE_MODE, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            # Write-ahead log, not synced on each commit (SQLite's synchronous=NORMAL): every
            # write survives the worker's crash, kill -9 included (it is in the kernel's
            # page cache, and the WAL is replayed on open); only the host's own crash or
            # power loss can take the last writes, and that also stops every guest on the
            # host, the only things the records protect. A synced commit is one fsync on the
            # path of every phase: 0.3 ms on some disks, 4 ms median (up to 12 under load)
            # on the lab machine's, several times per job.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"cannot open the worker's ledger in {directory}: {exc}") from None
        self._lock = threading.Lock()

    # --- images this worker created --------------------------------------------------------

    def record_image(self, job_id: str, path: str) -> None:
        """Remember `path` as made for `job_id`, before it is made (a crash still knows it)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO images VALUES (?, ?)", (job_id, path))

    def images(self, job_id: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT path FROM images WHERE job_id = ? ORDER BY path", (job_id,)
            ).fetchall()
        return [str(r[0]) for r in rows]

    def jobs_with_leftovers(self) -> list[str]:
        """The jobs this host still holds images, an incoming record or a booking for (a
        rollback that did not finish: worker/leftovers.py), oldest id first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id FROM images UNION SELECT job_id FROM incoming "
                "UNION SELECT job_id FROM bookings ORDER BY job_id"
            ).fetchall()
        return [str(r[0]) for r in rows]

    def forget_images(self, job_id: str, paths: list[str] | None = None) -> None:
        """Drop the job's images from the record (all of them, or `paths`)."""
        with self._lock:
            if paths is None:
                self._db.execute("DELETE FROM images WHERE job_id = ?", (job_id,))
            else:
                self._db.executemany(
                    "DELETE FROM images WHERE job_id = ? AND path = ?",
                    [(job_id, p) for p in paths],
                )

    # --- phases this worker ran ------------------------------------------------------------

    def claim(self, job_id: str, phase: str) -> bool:
        """True the first time this host runs `phase` of `job_id`."""
        with self._lock:
            cur = self._db.execute("INSERT OR IGNORE INTO claims VALUES (?, ?)", (job_id, phase))
        return cur.rowcount == 1

    def claimed(self, job_id: str, phase: str) -> bool:
        """Whether this host has claimed `phase` of `job_id` (and not given it back)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM claims WHERE job_id = ? AND phase = ?", (job_id, phase)
            ).fetchone()
        return row is not None

    def unclaim(self, job_id: str, phase: str) -> None:
        """Give a phase back before a retry (it stopped before changing anything)."""
        with self._lock:
            self._db.execute("DELETE FROM claims WHERE job_id = ? AND phase = ?", (job_id, phase))
            self._db.execute(
                "DELETE FROM phase_marks WHERE job_id = ? AND phase = ?", (job_id, phase)
            )

    def mark(self, job_id: str, phase: str, mark: PhaseMark) -> None:
        """Record that `phase` of `job_id` started or ended here."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO phase_marks VALUES (?, ?, ?)", (job_id, phase, mark)
            )

    def ran_here(self, job_id: str) -> bool:
        """Whether a phase of `job_id` started here: it was admitted when it did."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM phase_marks WHERE job_id = ? AND mark = ? LIMIT 1",
                (job_id, PhaseMark.STARTED),
            ).fetchone()
        return row is not None

    def marked(self, job_id: str, phase: str, mark: PhaseMark) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM phase_marks WHERE job_id = ? AND phase = ? AND mark = ?",
                (job_id, phase, mark),
            ).fetchone()
        return row is not None

    # --- domains this host is bringing in, and for which job ------------------------------

    def take_incoming(self, uuid: str, job_id: str, ended: Callable[[str], bool]) -> str | None:
        """Record `job_id` as the job bringing `uuid` in: None when it now is, else the live
        job that already is. An entry of a job that has `ended` (its rollback never came, or
        it succeeded before the entry was dropped) is taken over."""
        with self._lock:
            row = self._db.execute("SELECT job_id FROM incoming WHERE uuid = ?", (uuid,)).fetchone()
            holder = None if row is None else str(row[0])
            if holder is not None and holder != job_id and not ended(holder):
                return holder
            self._db.execute("INSERT OR REPLACE INTO incoming VALUES (?, ?)", (uuid, job_id))
        return None

    def incoming_job(self, uuid: str) -> str | None:
        """The job this host recorded as bringing `uuid` in, if any."""
        with self._lock:
            row = self._db.execute("SELECT job_id FROM incoming WHERE uuid = ?", (uuid,)).fetchone()
        return None if row is None else str(row[0])

    def incoming_uuid(self, job_id: str) -> str | None:
        """The uuid this host recorded `job_id` as bringing in, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT uuid FROM incoming WHERE job_id = ?", (job_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def drop_incoming(self, uuid: str, job_id: str) -> None:
        """Forget `uuid` as incoming, if `job_id` is the job recorded for it (and only then)."""
        with self._lock:
            self._db.execute("DELETE FROM incoming WHERE uuid = ? AND job_id = ?", (uuid, job_id))

    # --- memory booked here for guests coming in --------------------------------------------

    @contextmanager
    def room_held(self) -> Iterator[None]:
        """Held while the destination checks its room for a guest and books it. Without it,
        two guests coming in at once (on the worker's threads, or in a second worker process
        of this host while one drains) are both checked against the room before either is
        booked, and both fit (worker/ledger_limits.py `file_lock`)."""
        with file_lock(self._room):
            yield

    def book(self, job_id: str, mib: int) -> None:
        """Remember `mib` MiB as booked here for `job_id` (before Redis is told)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO bookings VALUES (?, ?)", (job_id, mib))

    def release_booking(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM bookings WHERE job_id = ?", (job_id,))

    # --- the guest as this host saw it before the migration -----------------------------

    def remember_facts(self, job_id: str, facts: SourceFacts) -> None:
        """Keep what this host's libvirt calls showed of the job's guest (the latest look)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO guest_facts VALUES (?, ?)",
                (job_id, facts.model_dump_json()),
            )

    def facts(self, job_id: str) -> SourceFacts | None:
        """What this host saw of the job's guest, or None when it never looked (or the row
        cannot be read: only root writes here, and nothing is assumed of it then)."""
        with self._lock:
            row = self._db.execute(
                "SELECT facts FROM guest_facts WHERE job_id = ?", (job_id,)
            ).fetchone()
        if row is None:
            return None
        try:
            return SourceFacts.model_validate_json(str(row[0]))
        except ValidationError:
            return None
