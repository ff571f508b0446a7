"""The ledger's records of what operators decided, as this host's worker saw it: a schedule's
times that fired here and the schedules removed, how often an evacuation queued a domain
again, that the host was disabled for maintenance, the jobs an operator cancelled, the
migrations an operator asked to abort, and the downtime an operator set on a migration. Each
is a decision a Redis write (or a restart of the worker) must not undo: an entry written back,
a count deleted, a maintenance entry removed by hand, a cancelled job written back to
`queued`, an abort's flag deleted.

A mixin of worker/ledger.py's Ledger (its connection, its lock, its schema).
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime


class OperatorRecords:
    _db: sqlite3.Connection
    _lock: threading.Lock

    # --- schedules fired here ------------------------------------------------------------

    def claim_fire(self, schedule_id: str, slot: datetime) -> bool:
        """True the first time only that `schedule_id` fires here for its time `slot`."""
        key = slot.astimezone(UTC).isoformat()
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO fired VALUES (?, ?)", (schedule_id, key)
            )
        return cursor.rowcount == 1

    def remove_schedule(self, schedule_id: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO removed_schedules VALUES (?)", (schedule_id,))

    def schedule_removed(self, schedule_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM removed_schedules WHERE schedule_id = ?", (schedule_id,)
            ).fetchone()
        return row is not None

    # --- jobs an operator cancelled ------------------------------------------------------

    def note_cancelled(self, job_id: str, by: str) -> None:
        """An operator cancelled `job_id` (its signed notice: worker/cancel_notice.py): no
        phase of it runs here again, whatever its record says later."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO cancelled VALUES (?, ?)", (job_id, by))

    def cancelled_by(self, job_id: str) -> str | None:
        """Who cancelled `job_id`, if this host heard of it; None when it did not."""
        with self._lock:
            row = self._db.execute(
                "SELECT by FROM cancelled WHERE job_id = ?", (job_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def note_abort_asked(self, job_id: str, reason: str) -> None:
        """An operator asked to abort the running migration of `job_id` (its signed notice:
        worker/cancel_notice.py): this host's monitor aborts it in libvirt, whatever the
        record's abort flag says later (deleted, written over)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO abort_asked VALUES (?, ?)", (job_id, reason))

    def withdraw_abort_asked(self, job_id: str) -> None:
        """libvirt refused the abort (a post-copy migration): it is not left pending."""
        with self._lock:
            self._db.execute("DELETE FROM abort_asked WHERE job_id = ?", (job_id,))

    def abort_asked(self, job_id: str) -> str | None:
        """Why the operator asked to abort `job_id`'s migration, if this host was told."""
        with self._lock:
            row = self._db.execute(
                "SELECT reason FROM abort_asked WHERE job_id = ?", (job_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    # --- the operator's downtime on a migration out of here ---------------------------------

    def note_operator_downtime(self, job_id: str, ms: int) -> None:
        """`drover tune --max-downtime`, as libvirt took it: it stands against the policy's
        downtime steps for the rest of the migration, a restart of this worker included
        (worker/migration_watch.py carry_out_step)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO operator_downtime VALUES (?, ?) "
                "ON CONFLICT (job_id) DO UPDATE SET ms = excluded.ms",
                (job_id, ms),
            )

    def operator_downtime(self, job_id: str) -> int | None:
        with self._lock:
            row = self._db.execute(
                "SELECT ms FROM operator_downtime WHERE job_id = ?", (job_id,)
            ).fetchone()
        return None if row is None else int(row[0])

    def note_finish_pause(self, job_id: str) -> None:
        """The guest of `job_id` is being paused so that its migration finishes (the
        operator's force-complete, the policy's suspend): a watch re-attached after this
        worker's restart stands down, as the one that paused it did (worker/monitor.py)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO finish_pauses VALUES (?)", (job_id,))

    def finish_paused(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM finish_pauses WHERE job_id = ?", (job_id,)
            ).fetchone()
        return row is not None

    # --- an evacuation's retries ---------------------------------------------------------

    def take_retry(self, evacuation_id: str, domain: str, limit: int) -> bool:
        """True if this host may queue `domain` once more for the evacuation (fewer than
        `limit` so far): the count a Redis write cannot reset."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO retries VALUES (?, ?, 1) ON CONFLICT (evacuation_id, domain) "
                "DO UPDATE SET taken = taken + 1 WHERE taken < ?",
                (evacuation_id, domain, limit),
            )
        return limit > 0 and cursor.rowcount == 1

    # --- maintenance -----------------------------------------------------------------------

    def note_disabled(self, host: str, seen: datetime) -> None:
        """The host was seen disabled at `seen` (this worker's clock): the latest such look is
        kept until an enable signed after it is accepted (`forget_disabled`). The latest, not
        the first: an enable signed between two disables (this worker away, or between its
        looks) ended the first, not the second."""
        with self._lock:
            self._db.execute(
                "INSERT INTO maintenance VALUES (?, ?) ON CONFLICT (host) DO UPDATE "
                "SET seen = excluded.seen WHERE excluded.seen > maintenance.seen",
                (host, seen.isoformat()),
            )

    def disabled_since(self, host: str) -> datetime | None:
        """When this worker last saw the host disabled, if it still counts so."""
        with self._lock:
            row = self._db.execute(
                "SELECT seen FROM maintenance WHERE host = ?", (host,)
            ).fetchone()
        return None if row is None else datetime.fromisoformat(str(row[0]))

    def forget_disabled(self, host: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM maintenance WHERE host = ?", (host,))
