"""A schedule's records as kept in its redbeat entry, and the names of its Redis keys."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from config.addresses import shown
from config.security import JOB_ID
from jobs.drain_options import DrainOptions
from jobs.errors import SubmitError
from jobs.phases import TASK_PREFIX

SCHEDULED_EVACUATION_TASK = f"{TASK_PREFIX}scheduled_evacuation"
# Tells the evacuated host's worker that a schedule was removed (schedules/removal.py).
SCHEDULE_REMOVED_TASK = f"{TASK_PREFIX}schedule_removed"

# Fields of the entry's hash that are drover's (redbeat owns `definition` and `meta`).
RECORD_FIELD = "drover"
# The signed request (jobs/request_signing.py) of the schedule, beside its record.
SIGNED_FIELD = "drover_request"
SCHEDULE_KIND = "schedule"
LAST_RUN_FIELD = "drover_last_run"
RUNS_FIELD = "drover_runs"

# An evacuation never starts more than this long after its time: a missed cron time is not
# caught up when a beat comes back (`beat_cron_starting_deadline`), a one-shot found late is
# skipped by the worker, and a message no worker of the host took within this long is
# dropped (Celery `expires`). Taking a host down hours late would surprise its operator.
FIRE_LATE_LIMIT_S = 600
# ... nor before its time, beyond this much (the beat's clock against the worker's host's):
# the worker checks every firing against the times its signed schedule names, as the beat's
# entry in Redis (`definition`, redbeat's) can be rewritten to fire at any moment.
FIRE_EARLY_LIMIT_S = 60
# A message delivered twice starts one evacuation: its id is remembered this long.
FIRE_CLAIM_TTL_S = 86_400

SCHEDULE_ID_PATTERN = r"^[0-9a-f]{12}$"


class ScheduleError(SubmitError):
    """A schedule refused before anything reached Redis; the message is one line."""


class ScheduleNotFound(LookupError):
    """No schedule with this id (never added, or removed)."""


class UnreadableSchedule(ScheduleNotFound, ValueError):
    """An entry drover cannot read (written into Redis by hand): one line naming it.

    Whoever reads many entries (`drover schedule list`, the fleet exporter, the beat) leaves
    it out and says so, instead of failing on it and never showing the others."""


class EvacuationRequest(DrainOptions):
    """What the operator asked to evacuate, with every option `drover evacuate` gives its
    children (jobs/drain_options.py); validated again whenever the schedule fires."""

    host: str
    to: list[str] = Field(default_factory=list)
    max_parallel: int | None = None
    include_inactive: bool = False


class ScheduleRecord(BaseModel):
    """drover's part of a redbeat entry: what to do, and when, as the operator wrote it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=SCHEDULE_ID_PATTERN)
    action: Literal["evacuate"] = "evacuate"
    request: EvacuationRequest
    cron: str | None = None
    # Times carry their offset (drover writes UTC): one without cannot be compared with now.
    at: AwareDatetime | None = None
    created: AwareDatetime
    created_by: str


class LastRun(BaseModel):
    """What the worker did the last time the schedule fired."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: AwareDatetime
    evacuation_id: str | None = None
    error: str | None = None


class Schedule(BaseModel):
    """A schedule as `drover schedule list` shows it."""

    model_config = ConfigDict(frozen=True)

    record: ScheduleRecord
    next_run: AwareDatetime | None
    sent_at: AwareDatetime | None
    last_run: LastRun | None
    runs: int = Field(ge=0)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def fired(self) -> bool:
        """A one-shot schedule that beat has sent (it never fires again)."""
        return self.record.at is not None and self.sent_at is not None

    def what(self) -> str:
        req = self.record.request
        text = f"evacuate {req.host} to {','.join(req.to) if req.to else 'any host'}"
        if req.max_parallel is not None:
            text += f", {req.max_parallel} at a time"
        if req.include_inactive:
            text += ", inactive too"
        if req.policy is not None:
            text += f", policy {req.policy}"
        return text

    def when(self) -> str:
        if self.record.cron is not None:
            return f"cron '{self.record.cron}' UTC"
        assert self.record.at is not None
        return f"once at {utc_text(self.record.at)}" + (" (fired)" if self.fired else "")

    def summary(self) -> dict[str, Any]:
        """The stable JSON form (`--json`): times in ISO-8601 UTC."""
        return {
            "id": self.id,
            "action": self.record.action,
            "request": self.record.request.model_dump(mode="json"),
            "cron": self.record.cron,
            "at": utc_text(self.record.at) if self.record.at else None,
            "what": self.what(),
            "when": self.when(),
            "next_run": utc_text(self.next_run) if self.next_run else None,
            "fired": self.fired,
            "sent_at": utc_text(self.sent_at) if self.sent_at else None,
            "last_run": self.last_run.model_dump(mode="json") if self.last_run else None,
            "runs": self.runs,
            "created": utc_text(self.record.created),
            "created_by": self.record.created_by,
        }


def utc_text(when: datetime) -> str:
    """`2030-06-01T03:00:00Z`: what every drover schedule output shows."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_schedule_id(schedule_id: str) -> str:
    """A schedule id is 12 hex characters: anything else never reaches Redis."""
    if not JOB_ID.match(schedule_id):
        raise ScheduleError(f"invalid schedule id {shown(schedule_id)} (12 hex characters)")
    return schedule_id
