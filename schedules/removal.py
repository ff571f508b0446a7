"""Telling the evacuated host's worker that a schedule was removed.

Deleting the entry from Redis stops the beat, but anyone who can read Redis can keep a copy of
the entry, signature and all, and write it back later: it verifies, and it would fire at its
signed times again. So `drover schedule remove` also sends `drover.schedule_removed` to the
queue of the schedule's host, whose worker keeps the removal in its own ledger and never
fires that schedule again. What remains: a Redis password can delete that message from the
queue while the host's worker is down, before it is taken (docs/security.md).
"""

from __future__ import annotations

from config.celery import host_queue, make_app
from config.security import ensure_signing
from config.settings import Settings
from schedules.records import SCHEDULE_REMOVED_TASK


def tell_removed(settings: Settings, schedule_id: str, host: str) -> None:
    """Send the removal to `host`'s worker, signed like every producer's message."""
    app = make_app(settings)
    ensure_signing(app, settings)
    app.send_task(SCHEDULE_REMOVED_TASK, args=[schedule_id], queue=host_queue(host))
