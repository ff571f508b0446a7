"""The task a schedule fires: start the evacuation it stands for (schedules/firing.py).

The worker of the host being evacuated runs it and starts the evacuation itself, through the
evacuation service (jobs/evacuations.py) on its own store and Celery app: no producer, no
second Redis pool, no round trip through the broker to reach the same worker.
"""

from __future__ import annotations

from celery import Task

from config.celery import app
from config.events import get_logger
from config.settings import current
from jobs.evacuations import EvacuationService
from jobs.request_signing import signer_for
from jobs.store import JobStore
from schedules import firing
from schedules.firing import FiringLedger
from schedules.firing import origin as origin
from schedules.records import SCHEDULE_REMOVED_TASK, SCHEDULED_EVACUATION_TASK
from worker.runtime import runtime_for_node

log = get_logger()


def fire(
    schedule_id: str,
    *,
    message_id: str,
    node: str,
    ledger: FiringLedger,
    store: JobStore | None = None,
) -> str | None:
    """Fire schedule `schedule_id` on worker `node` (`drover@HOST`); the evacuation's id, or
    None when nothing started. `ledger`: the host's own (worker/ledger.py).
    `store` is the worker's own; None opens one (a caller outside a worker: a test)."""
    settings = current()
    if store is None:
        store = JobStore.from_settings(settings, retry_for=settings.tunables.redis_retry_for)
    service = EvacuationService(
        settings,
        store,
        app,
        lambda signature: signature.apply_async(),
        signer_for(settings.security),
    )
    return firing.fire(
        settings, schedule_id, message_id=message_id, node=node, service=service, ledger=ledger
    )


@app.task(bind=True, name=SCHEDULED_EVACUATION_TASK)
def scheduled_evacuation(self: Task, schedule_id: str) -> str | None:
    node = str(self.request.hostname)
    rt = runtime_for_node(node)
    message_id = str(self.request.id)
    return fire(schedule_id, message_id=message_id, node=node, ledger=rt.ledger, store=rt.store)


@app.task(bind=True, name=SCHEDULE_REMOVED_TASK)
def schedule_removed(self: Task, schedule_id: str) -> str:
    """`drover schedule remove` told this host: the schedule never fires here again, even if
    its entry (signed as it was) is written back into Redis. A forged message can only stop a
    schedule, as deleting its entry in Redis already can."""
    rt = runtime_for_node(str(self.request.hostname))
    rt.ledger.remove_schedule(schedule_id)
    log.info("schedule.removed", schedule_id=schedule_id)
    return schedule_id
