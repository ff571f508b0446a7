"""The task a schedule fires: start the evacuation it stands for (schedules/firing.py).

The worker of the host being evacuated runs it and starts the evacuation itself, through the
evacuation service (jobs/evacuations.py) on its own store and Celery app: no producer, no
second Redis pool, no round trip through the broker to reach the same worker.
"""

from __future__ import annotations

from celery import Task

from config.celery import app
from config.settings import current
from jobs.evacuations import EvacuationService
from jobs.request_signing import signer_for
from jobs.store import JobStore
from schedules import firing
from schedules.firing import FireClaim
from schedules.firing import origin as origin
from schedules.records import SCHEDULED_EVACUATION_TASK
from worker.runtime import runtime_for_node


def fire(
    schedule_id: str,
    *,
    message_id: str,
    node: str,
    claim: FireClaim,
    store: JobStore | None = None,
) -> str | None:
    """Fire schedule `schedule_id` on worker `node` (`drover@HOST`); the evacuation's id, or
    None when nothing started. `claim`: the host's ledger's (one evacuation per signed time).
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
        settings, schedule_id, message_id=message_id, node=node, service=service, claim=claim
    )


@app.task(bind=True, name=SCHEDULED_EVACUATION_TASK)
def scheduled_evacuation(self: Task, schedule_id: str) -> str | None:
    node = str(self.request.hostname)
    rt = runtime_for_node(node)
    message_id = str(self.request.id)
    return fire(
        schedule_id, message_id=message_id, node=node, claim=rt.ledger.claim_fire, store=rt.store
    )
