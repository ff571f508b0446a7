"""The worker's own records on its host: what it made, and which phases it has run.

Redis tells a worker which job to work on, never what to do to its host, so what a worker
must remember in order to undo its own work lives here, on the host, where only root can
write (the registry's `state_dir`, mode 0700):

- the disk images it created for a job: a rollback removes exactly these, never a path read
  from a job record;
- the phases it has run for a job: a phase runs once per job on this host, even if someone
  with the Redis password deletes the claims in Redis and sends it again.

SQLite (the standard library's), one small file, one connection shared by the worker's
threads behind a lock.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

LEDGER_FILE = "ledger.sqlite3"
DIR_MODE = 0o700
FILE_MODE = 0o600
_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (job_id TEXT NOT NULL, path TEXT NOT NULL,
                                   PRIMARY KEY (job_id, path));
CREATE TABLE IF NOT EXISTS claims (job_id TEXT NOT NULL, phase TEXT NOT NULL,
                                   PRIMARY KEY (job_id, phase));
"""


class LedgerError(Exception):
    """The ledger cannot be opened; the message is one line."""


class Ledger:
    def __init__(self, directory: str) -> None:
        base = Path(directory)
        try:
            base.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            base.chmod(DIR_MODE)
            path = base / LEDGER_FILE
            path.touch(mode=FILE_MODE, exist_ok=True)
            path.chmod(FILE_MODE)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
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

    def unclaim(self, job_id: str, phase: str) -> None:
        """Give a phase back before a retry (it stopped before changing anything)."""
        with self._lock:
            self._db.execute("DELETE FROM claims WHERE job_id = ? AND phase = ?", (job_id, phase))
