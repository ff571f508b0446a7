"""Add, list and remove scheduled evacuations in Redis; read one back when it fires."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any, cast

import redis
from redbeat.schedulers import RedBeatSchedulerEntry, get_redis

from config.addresses import shown
from config.celery import host_queue
from config.settings import ConfigError, Settings
from jobs.evacuations import validate_evacuation
from jobs.keys import schedule_entry_key, schedule_fired_key
from jobs.store import now
from schedules.beat import redbeat_app
from schedules.cron import normal_cron, one_shot, parse_at, parse_cron
from schedules.entries import read_schedules, record_from, schedule_from_fields
from schedules.records import (
    FIRE_CLAIM_TTL_S,
    FIRE_LATE_LIMIT_S,
    LAST_RUN_FIELD,
    RECORD_FIELD,
    RUNS_FIELD,
    SCHEDULED_EVACUATION_TASK,
    SIGNED_FIELD,
    EvacuationRequest,
    LastRun,
    Schedule,
    ScheduleError,
    ScheduleNotFound,
    ScheduleRecord,
    check_schedule_id,
)
from schedules.signing import signed_fields, verify_record

# KEYS[1] the entry's hash; ARGV[1] the record field, ARGV[2] last-run field, ARGV[3] its JSON,
# ARGV[4] the run counter. Writes nothing for a removed entry (no half-entry left behind).
_RECORD_RUN_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[1], ARGV[4], 1)
return 1
"""


class ScheduleStore:
    """Add, list and remove scheduled evacuations; read one back when it fires."""

    def __init__(self, settings: Settings, *, retry_period: float | None = None) -> None:
        self.settings = settings
        self.app = redbeat_app(settings, retry_period=retry_period)
        self.r: redis.Redis = get_redis(self.app)

    @property
    def index_key(self) -> str:
        return cast(str, self.app.redbeat_conf.schedule_key)

    def add_evacuation(
        self,
        request: EvacuationRequest,
        *,
        cron: str | None = None,
        at: str | None = None,
        by: str,
    ) -> Schedule:
        """Validate everything, then write the entry; bad input never reaches Redis."""
        current = now()
        if (cron is None) == (at is None):
            raise ScheduleError("give exactly one of --cron EXPR and --at TIME")
        schedule: Any
        when: datetime | None = None
        if cron is not None:
            schedule = parse_cron(cron, reference=current)
            cron = normal_cron(cron)
        else:
            assert at is not None
            when = parse_at(at, reference=current)
            schedule = one_shot(when)
        validate_request(self.settings, request)
        schedule_id = self._new_id()
        record = ScheduleRecord(
            id=schedule_id, request=request, cron=cron, at=when, created=current, created_by=by
        )
        entry = RedBeatSchedulerEntry(
            name=schedule_id,
            task=SCHEDULED_EVACUATION_TASK,
            schedule=schedule,
            args=[schedule_id],
            kwargs={},
            options={"queue": host_queue(request.host), "expires": FIRE_LATE_LIMIT_S},
            app=self.app,
        )
        # A cron entry's first run is the first match after now (without a last run, Celery
        # would call it overdue and fire at once); a one-shot has no run before its time.
        entry.last_run_at = current if cron is not None else None
        # Signed like any request (schedules/signing.py). The record first: an entry the
        # beat can see always has its request.
        fields = {RECORD_FIELD: record.model_dump_json()}
        fields.update(signed_fields(self.settings, record, by, current))
        self.r.hset(schedule_entry_key(schedule_id), mapping=fields)
        try:
            entry.save()
        except BaseException:
            self.r.delete(schedule_entry_key(schedule_id))
            raise
        return self.get(schedule_id)

    def _new_id(self) -> str:
        while True:
            schedule_id = secrets.token_hex(6)
            if not self.r.exists(schedule_entry_key(schedule_id)):
                return schedule_id

    def record(self, schedule_id: str) -> ScheduleRecord:
        """The stored record, or ScheduleNotFound (removed, never added; UnreadableSchedule
        for one drover cannot read)."""
        raw = cast(
            str | None,
            self.r.hget(schedule_entry_key(check_schedule_id(schedule_id)), RECORD_FIELD),
        )
        if raw is None:
            raise ScheduleNotFound(f"no schedule {shown(schedule_id)}")
        return record_from(raw, schedule_entry_key(schedule_id))

    def verified_record(self, schedule_id: str) -> ScheduleRecord:
        """The record, if a trusted key signed it as it stands (RequestRefused otherwise)."""
        record = self.record(schedule_id)
        signed = cast(str | None, self.r.hget(schedule_entry_key(schedule_id), SIGNED_FIELD))
        verify_record(self.settings, record, signed)
        return record

    def get(self, schedule_id: str) -> Schedule:
        fields = cast(
            dict[str, str], self.r.hgetall(schedule_entry_key(check_schedule_id(schedule_id)))
        )
        schedule = schedule_from_fields(fields, key=schedule_entry_key(schedule_id))
        if schedule is None:
            raise ScheduleNotFound(f"no schedule {shown(schedule_id)}")
        return schedule

    def list(self, *, unreadable: list[str] | None = None) -> list[Schedule]:
        """Every schedule, oldest first (entries that are not drover's are left out; with
        `unreadable`, so are those drover cannot read, said there: see read_schedules)."""
        return read_schedules(self.r, self.index_key, unreadable=unreadable)

    def remove(self, schedule_id: str) -> str | None:
        """Delete the entry: a beat never fires it again, a worker ignores a message in flight.
        An entry drover cannot read is removed too (that is how it goes away). The host it
        evacuates, to be told (schedules/removal.py); None for an entry drover cannot read."""
        key = schedule_entry_key(check_schedule_id(schedule_id))
        try:
            ours = self.r.hexists(key, RECORD_FIELD)
        except redis.ResponseError:  # not a hash at all: unreadable, and removed the same
            ours = True
        if not ours:
            raise ScheduleNotFound(f"no schedule {shown(schedule_id)}")
        try:
            host: str | None = self.record(schedule_id).request.host
        except (ScheduleNotFound, redis.ResponseError):
            host = None
        RedBeatSchedulerEntry(name=schedule_id, app=self.app).delete()
        return host

    def claim_fire(self, schedule_id: str, message_id: str) -> bool:
        """True for the first delivery of a fired message only."""
        key = schedule_fired_key(schedule_id, message_id)
        return bool(self.r.set(key, "1", nx=True, ex=FIRE_CLAIM_TTL_S))

    def record_run(self, schedule_id: str, run: LastRun) -> None:
        """Remember what the last firing did (nothing, if the schedule was removed meanwhile)."""
        self.r.eval(
            _RECORD_RUN_LUA,
            1,
            schedule_entry_key(schedule_id),
            RECORD_FIELD,
            LAST_RUN_FIELD,
            run.model_dump_json(),
            RUNS_FIELD,
        )


def validate_request(settings: Settings, request: EvacuationRequest) -> Any:
    """The evacuation request checked as `drover evacuate` would (SubmitError, one line).

    Host names are checked against the registry here too, before the evacuation's own
    validation, so a typo is refused with the same words `drover migrate` uses.
    """
    try:
        for host in (request.host, *request.to):
            settings.host(host)
    except ConfigError as exc:
        raise ScheduleError(str(exc)) from None
    return validate_evacuation(settings, **request.model_dump())
