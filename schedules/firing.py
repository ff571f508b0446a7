"""What the host's worker does when a schedule fires: start the evacuation it stands for.

`drover beat` sends `drover.scheduled_evacuation` with the schedule id as its only argument to
the queue of the host to evacuate. The message carries nothing to trust: the request is read
back from the schedule's entry in Redis, its signature checked, and it is validated again
against today's registry, exactly as `drover evacuate` would validate it; the evacuation is
then started through the same service (jobs/evacuations.py), called directly by the worker.
A schedule removed after the message was sent is logged and ignored. The beat's entry says
when to send, and a Redis password can rewrite it: the worker starts an evacuation only at a
time the signed record names (schedules/cron.py `fire_slot`), once per such time on this host
(the host's own ledger, which Redis cannot reset), and never for a schedule that ledger
knows was removed (schedules/removal.py), whatever Redis holds now.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import redis

from config.events import get_logger
from config.settings import Settings
from jobs.errors import BrokerUnavailable, SubmitError
from jobs.evacuations import EvacuationService
from jobs.request_signing import SECURITY_REASON, RequestRefused
from jobs.store import now
from schedules.cron import fire_slot
from schedules.records import LastRun, ScheduleNotFound, UnreadableSchedule, utc_text
from schedules.store import ScheduleStore

log = get_logger()
ORIGIN_PREFIX = "schedule:"


class FiringLedger(Protocol):
    """What a firing asks of the host's own ledger (worker/ledger.py)."""

    def claim_fire(self, schedule_id: str, slot: datetime) -> bool:
        """True the first time only that the schedule fires here for its time `slot`."""

    def schedule_removed(self, schedule_id: str) -> bool:
        """Whether this host was told the schedule was removed."""


def origin(schedule_id: str) -> str:
    """How an evacuation started by a schedule names its origin."""
    return f"{ORIGIN_PREFIX}{schedule_id}"


def fire(
    settings: Settings,
    schedule_id: str,
    *,
    message_id: str,
    node: str,
    service: EvacuationService,
    ledger: FiringLedger,
) -> str | None:
    """Start the evacuation of schedule `schedule_id`; its id, or None when nothing started.

    `node` is the Celery node running this (`drover@HOST`): only the worker of the host being
    evacuated starts its evacuation, as beat routes it there.
    """
    store = ScheduleStore(settings, retry_period=settings.tunables.redis_retry_for)
    fields = {"schedule_id": schedule_id, "message_id": message_id}
    try:
        record = store.verified_record(schedule_id)
    except UnreadableSchedule as exc:  # written into Redis by hand: nothing to start from
        log.warning("record.unreadable", reason=str(exc), **fields)
        return None
    except ScheduleNotFound:
        log.warning("schedule.ignored", reason="no such schedule (removed?)", **fields)
        return None
    except RequestRefused as exc:
        # Written into Redis by hand, or changed since `drover schedule add` signed it.
        reason = f"{SECURITY_REASON}: {exc}"
        store.record_run(schedule_id, LastRun(at=now(), error=reason))
        log.error("security.rejected", reason=reason, **fields)
        return None
    host = record.request.host
    here = node.split("@", 1)[-1]
    if here != host:
        log.warning("schedule.ignored", src=host, reason=f"sent to {here}, not {host}", **fields)
        return None
    if ledger.schedule_removed(schedule_id):
        reason = "removed (drover schedule remove); its entry in Redis was written back"
        log.warning("schedule.ignored", src=host, reason=reason, **fields)
        return None
    if not store.claim_fire(schedule_id, message_id):
        log.warning("schedule.ignored", src=host, reason="message delivered twice", **fields)
        return None
    slot = fire_slot(record, now())
    if isinstance(slot, str):
        store.record_run(schedule_id, LastRun(at=now(), error=slot))
        log.warning("schedule.refused", src=host, reason=slot, **fields)
        return None
    if not ledger.claim_fire(schedule_id, slot):
        reason = f"already fired for its time {utc_text(slot)}"
        log.warning("schedule.ignored", src=host, reason=reason, **fields)
        return None
    try:
        spec = service.validate(**record.request.model_dump())
        evacuation_id = service.start(spec, origin(schedule_id))
    except (SubmitError, BrokerUnavailable, redis.ResponseError) as exc:
        # ResponseError: a key of the evacuation's the wrong type (written by hand), which
        # is no outage: the run is recorded as refused, with what Redis said.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        store.record_run(schedule_id, LastRun(at=now(), error=reason))
        log.warning("schedule.refused", src=host, reason=reason, **fields)
        return None
    store.record_run(schedule_id, LastRun(at=now(), evacuation_id=evacuation_id))
    log.info("schedule.fired", src=host, evacuation_id=evacuation_id, **fields)
    return evacuation_id
