"""Scheduled evacuations: entries of celery-redbeat's scheduler, kept in Redis.

Why redbeat: the schedule lives in Redis beside the jobs (no schedule file on one machine to
lose), entries can be added and removed while `drover beat` runs, and a lock in Redis lets
several beats stand by while exactly one fires.

Each entry sends `drover.scheduled_evacuation` with its schedule id as the only argument
(workers accept nothing else, config/security.py) to the queue of the host it evacuates; that
host's worker reads the stored request back and validates it again before evacuating. The
request is kept in the entry's own Redis hash, beside redbeat's `definition` and `meta` fields,
so removing the entry removes it too.

Times are UTC throughout: cron expressions are evaluated in UTC (Celery's default timezone),
and an `--at` time without an offset is taken as UTC.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Any, Literal, cast

import redis
from celery import Celery
from celery.schedules import crontab, crontab_parser
from pydantic import BaseModel, ConfigDict, Field
from redbeat.schedulers import RedBeatSchedulerEntry, get_redis
from redbeat.schedules import rrule

from config.celery import celery_config, host_queue, make_app
from config.security import JOB_ID
from config.settings import ConfigError, Settings
from jobs.phases import TASK_PREFIX
from jobs.request_signing import (
    REQUEST_FIELD,
    check_record,
    signed_record,
    signer_for,
    verifier_for,
)
from jobs.store import KEY_PREFIX as JOBS_KEY_PREFIX
from jobs.store import now
from producer.api import Drover, SubmitError

SCHEDULED_EVACUATION_TASK = f"{TASK_PREFIX}scheduled_evacuation"
REDBEAT_SCHEDULER = "redbeat.RedBeatScheduler"

# redbeat names an entry's hash `<prefix><name>` (the name is the schedule id) and keeps its
# index in `<prefix>:schedule`; the lock must start with the prefix too.
KEY_PREFIX = f"{JOBS_KEY_PREFIX}:schedule:"
LOCK_KEY = f"{KEY_PREFIX}lock"
# Fields of the entry's hash that are drover's (redbeat owns `definition` and `meta`).
RECORD_FIELD = "drover"
# The signed request (jobs/request_signing.py) of the schedule, beside its record.
SIGNED_FIELD = "drover_request"
SCHEDULE_KIND = "schedule"
LAST_RUN_FIELD = "drover_last_run"
RUNS_FIELD = "drover_runs"

# A beat looks for due entries at least this often, so an entry added while it runs fires on
# time (redbeat's default of 300 s would sleep straight past a schedule added a minute ahead).
BEAT_MAX_INTERVAL_S = 1.0
# A standby beat takes over at most this long after the active one died without releasing
# the lock (a beat stopped normally releases it at once). Longer than a tick can take.
BEAT_LOCK_TIMEOUT_S = 60
# An evacuation never starts more than this long after its time: a missed cron time is not
# caught up when a beat comes back (`beat_cron_starting_deadline`), a one-shot found late is
# skipped by the worker, and a message no worker of the host took within this long is
# dropped (Celery `expires`). Taking a host down hours late would surprise its operator.
FIRE_LATE_LIMIT_S = 600
# A message delivered twice starts one evacuation: its id is remembered this long.
FIRE_CLAIM_TTL_S = 86_400

CRON_FORM = "minute hour day-of-month month day-of-week, in UTC"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Names stand for the numbers from the field's lowest on, in this order (Vixie cron's).
MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (name, lowest, highest, names it takes) for the five cron fields, in cron order.
CRON_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, MONTH_NAMES),
    ("day of week", 0, 6, DAY_NAMES),
)
_CRON_CHARS = re.compile(r"^[A-Za-z0-9*/, -]+\Z")
_CRON_VALUE = r"(?:[0-9]{1,2}|[a-z]{3})"
# One comma-separated part: *, */N, A, A-B or A-B/N (Vixie cron's forms, without A/N).
_CRON_PART = re.compile(
    rf"^(?:(?:\*|(?P<lo>{_CRON_VALUE})-(?P<hi>{_CRON_VALUE}))(?:/(?P<step>[0-9]{{1,2}}))?"
    rf"|(?P<one>{_CRON_VALUE}))\Z"
)
SCHEDULE_ID_PATTERN = r"^[0-9a-f]{12}$"


class ScheduleError(SubmitError):
    """A schedule refused before anything reached Redis; the message is one line."""


class ScheduleNotFound(LookupError):
    """No schedule with this id (never added, or removed)."""


class EvacuationRequest(BaseModel):
    """What the operator asked to evacuate; validated again whenever the schedule fires."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    to: list[str] = []
    max_parallel: int | None = None
    include_inactive: bool = False


class ScheduleRecord(BaseModel):
    """drover's part of a redbeat entry: what to do, and when, as the operator wrote it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=SCHEDULE_ID_PATTERN)
    action: Literal["evacuate"] = "evacuate"
    request: EvacuationRequest
    cron: str | None = None
    at: datetime | None = None
    created: datetime
    created_by: str


class LastRun(BaseModel):
    """What the worker did the last time the schedule fired."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: datetime
    evacuation_id: str | None = None
    error: str | None = None


class Schedule(BaseModel):
    """A schedule as `drover schedule list` shows it."""

    model_config = ConfigDict(frozen=True)

    record: ScheduleRecord
    next_run: datetime | None
    sent_at: datetime | None
    last_run: LastRun | None
    runs: int

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


def entry_key(schedule_id: str) -> str:
    return f"{KEY_PREFIX}{schedule_id}"


def fire_claim_key(schedule_id: str, message_id: str) -> str:
    return f"{entry_key(schedule_id)}:fired:{message_id}"


def check_schedule_id(schedule_id: str) -> str:
    """A schedule id is 12 hex characters: anything else never reaches Redis."""
    if not JOB_ID.match(schedule_id):
        raise ScheduleError(f"invalid schedule id {schedule_id!r} (12 hex characters)")
    return schedule_id


# --- when: strict parsing -------------------------------------------------------------------


def _cron_number(text: str, low: int, names: tuple[str, ...]) -> int | None:
    """A field value (digits, or one of the field's names) as its number; None if neither."""
    if text.isascii() and text.isdigit():
        return int(text)
    return low + names.index(text) if text in names else None


def _cron_value_problem(
    text: str, name: str, low: int, high: int, names: tuple[str, ...]
) -> str | None:
    """Celery takes any month or day name in either field (`jan` as a weekday is Monday), so
    each field takes its own names only."""
    value = _cron_number(text, low, names)
    if value is None:
        if not names:
            return f"{name} takes numbers only, not {text!r}"
        return f"{name} {text!r} is neither a number nor one of {', '.join(names)}"
    return None if low <= value <= high else f"{name} {value} is outside {low}-{high}"


def _cron_field_problem(
    field: str, name: str, low: int, high: int, names: tuple[str, ...]
) -> str | None:
    for part in field.split(","):
        match = _CRON_PART.match(part)
        if match is None:
            return f"{name} field {field!r}: {part!r} is not *, N, N-M or a step /N of those"
        for bound in (match["lo"], match["hi"], match["one"]):
            problem = bound and _cron_value_problem(bound, name, low, high, names)
            if problem:
                return problem
        lo, hi = match["lo"], match["hi"]
        first = _cron_number(lo, low, names) if lo else None
        last = _cron_number(hi, low, names) if hi else None
        # Celery would wrap a backwards range (fri-mon as fri-sat,sun-mon); cron refuses it.
        if first is not None and last is not None and first > last:
            return f"{name} range {lo}-{hi} runs backwards"
        if match["step"] is not None and int(match["step"]) == 0:
            return f"{name} step /0"
    return None


def parse_cron(expr: str, *, reference: datetime | None = None) -> crontab:
    """A strict 5-field cron expression as a Celery crontab, or ScheduleError with one line.

    Stricter than Celery's own parser: exactly five fields, Vixie cron's forms only, no
    backwards ranges (Celery would wrap them), and a day that exists (`0 0 31 2 *` never
    fires, so it is refused rather than left to fail in the beat).
    """
    where = f"--cron {expr!r}"
    if not _CRON_CHARS.match(expr):
        raise ScheduleError(f"{where}: only digits, names, '*', '/', ',', '-' and spaces")
    fields = expr.lower().split()
    if len(fields) != len(CRON_FIELDS):
        raise ScheduleError(f"{where}: {len(fields)} fields, need 5 ({CRON_FORM})")
    for field, (name, low, high, names) in zip(fields, CRON_FIELDS, strict=True):
        problem = _cron_field_problem(field, name, low, high, names)
        if problem:
            raise ScheduleError(f"{where}: {problem}")
    minute, hour, day_of_month, month, day_of_week = fields
    no_day = ScheduleError(f"{where}: matches no day that exists")
    try:
        # Checked first: Celery 5.7 refuses such a crontab itself, in words of its own.
        if not _some_day_exists(day_of_month, month):
            raise no_day
        schedule = crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month,
            day_of_week=day_of_week,
        )
    except ScheduleError:
        raise
    except Exception as exc:  # Celery's ParseException, ValueError: unknown names, ranges
        raise ScheduleError(f"{where}: {str(exc).rstrip('.')}") from None
    try:
        schedule.remaining_estimate(reference or now())
    except RuntimeError:
        raise no_day from None
    return schedule


# The most days each month can have (February: in a leap year).
DAYS_IN_MONTH = {
    1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31,
}  # fmt: skip


def _some_day_exists(day_of_month: str, month: str) -> bool:
    """Whether a day of `day_of_month` falls in a month of `month` (`31 2` never does)."""
    days = crontab_parser(31, 1).parse(day_of_month)
    months = crontab_parser(12, 1).parse(month)
    return any(day <= DAYS_IN_MONTH[m] for m in months for day in days)


def normal_cron(expr: str) -> str:
    """One spelling per expression (single spaces, lower-case names), as `list` shows it."""
    return " ".join(expr.lower().split())


def parse_at(text: str, *, reference: datetime | None = None) -> datetime:
    """An ISO-8601 time in the future, in UTC to the second; without an offset it is UTC."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ScheduleError(
            f"--at {text!r} is not an ISO-8601 time (e.g. 2030-06-01T03:00:00Z)"
        ) from None
    try:
        when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-14:00 is in the year 10000 in UTC
        raise ScheduleError(
            f"--at {text!r} is out of range: in UTC it must fall within the years 1 to 9999"
        ) from None
    when = when.replace(microsecond=0)  # redbeat keeps whole seconds
    current = reference or now()
    if when <= current:
        raise ScheduleError(f"--at {utc_text(when)} is in the past (now {utc_text(current)})")
    return when


def one_shot(when: datetime) -> rrule:
    """An rrule that occurs once, at `when`: redbeat never fires it again afterwards."""
    return rrule("SECONDLY", dtstart=when, count=1)


# --- the store --------------------------------------------------------------------------------


def redbeat_config(settings: Settings, *, retry_period: float | None = None) -> dict[str, Any]:
    """Celery settings for redbeat, all explicit (redbeat 2.5 drops its broker fallbacks).

    `retry_period` lets a worker's reads ride out a Redis restart; producers and the beat
    fail at once instead.
    `result_expires = None` keeps Celery from adding its daily `backend_cleanup` entry, which
    no drover worker consumes (drover stores no results).
    """
    options: dict[str, Any] = {} if retry_period is None else {"retry_period": retry_period}
    return {
        "redbeat_redis_url": settings.redis_url,
        "redbeat_redis_options": options,
        "redbeat_key_prefix": KEY_PREFIX,
        "redbeat_lock_key": LOCK_KEY,
        "redbeat_lock_timeout": BEAT_LOCK_TIMEOUT_S,
        "beat_scheduler": REDBEAT_SCHEDULER,
        "beat_max_loop_interval": BEAT_MAX_INTERVAL_S,
        "beat_cron_starting_deadline": FIRE_LATE_LIMIT_S,
        "result_expires": None,
    }


def redbeat_app(settings: Settings, *, retry_period: float | None = None) -> Celery:
    """A Celery app with the fleet's settings plus redbeat's, for reading and writing entries."""
    app = Celery("drover", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.update(redbeat_config(settings, retry_period=retry_period))
    return app


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
        # Signed like any request: a worker creates (and signs) the evacuation when it fires,
        # so an entry written into Redis by hand must not be able to drain a host.
        signed = signed_record(
            signer_for(self.settings.security),
            kind=SCHEDULE_KIND,
            job_id=schedule_id,
            spec=record,
            origin=by,
            at=current,
        )
        # The record first: an entry the beat can see always has its request.
        fields = {RECORD_FIELD: record.model_dump_json()}
        if REQUEST_FIELD in signed:
            fields[SIGNED_FIELD] = signed[REQUEST_FIELD]
        self.r.hset(entry_key(schedule_id), mapping=fields)
        try:
            entry.save()
        except BaseException:
            self.r.delete(entry_key(schedule_id))
            raise
        return self.get(schedule_id)

    def _new_id(self) -> str:
        while True:
            schedule_id = secrets.token_hex(6)
            if not self.r.exists(entry_key(schedule_id)):
                return schedule_id

    def record(self, schedule_id: str) -> ScheduleRecord:
        """The stored record, or ScheduleNotFound (removed, never added)."""
        raw = cast(str | None, self.r.hget(entry_key(check_schedule_id(schedule_id)), RECORD_FIELD))
        if raw is None:
            raise ScheduleNotFound(f"no schedule {schedule_id!r}")
        return ScheduleRecord.model_validate_json(raw)

    def verified_record(self, schedule_id: str) -> ScheduleRecord:
        """The record, if a trusted key signed it as it stands (RequestRefused otherwise)."""
        record = self.record(schedule_id)
        signed = cast(str | None, self.r.hget(entry_key(schedule_id), SIGNED_FIELD))
        verifier = verifier_for(self.settings.security)
        check_record(verifier, signed, schedule_id, kind=SCHEDULE_KIND, spec=record)
        return record

    def get(self, schedule_id: str) -> Schedule:
        fields = cast(dict[str, str], self.r.hgetall(entry_key(check_schedule_id(schedule_id))))
        schedule = self._from_fields(fields)
        if schedule is None:
            raise ScheduleNotFound(f"no schedule {schedule_id!r}")
        return schedule

    def list(self) -> list[Schedule]:
        """Every schedule, oldest first (entries that are not drover's are left out)."""
        keys = cast(list[str], self.r.zrange(self.index_key, 0, -1))
        with self.r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            rows = cast(list[dict[str, str]], pipe.execute())
        found = [s for s in (self._from_fields(row) for row in rows) if s is not None]
        return sorted(found, key=lambda s: (s.record.created, s.id))

    def remove(self, schedule_id: str) -> ScheduleRecord:
        """Delete the entry: a beat never fires it again, a worker ignores a message in flight."""
        record = self.record(schedule_id)
        RedBeatSchedulerEntry(name=schedule_id, app=self.app).delete()
        return record

    def claim_fire(self, schedule_id: str, message_id: str) -> bool:
        """True for the first delivery of a fired message only."""
        key = fire_claim_key(schedule_id, message_id)
        return bool(self.r.set(key, "1", nx=True, ex=FIRE_CLAIM_TTL_S))

    def record_run(self, schedule_id: str, run: LastRun) -> None:
        """Remember what the last firing did (nothing, if the schedule was removed meanwhile)."""
        self.r.eval(
            _RECORD_RUN_LUA,
            1,
            entry_key(schedule_id),
            RECORD_FIELD,
            LAST_RUN_FIELD,
            run.model_dump_json(),
            RUNS_FIELD,
        )

    def _from_fields(self, fields: dict[str, str]) -> Schedule | None:
        if RECORD_FIELD not in fields:
            return None
        record = ScheduleRecord.model_validate_json(fields[RECORD_FIELD])
        meta = RedBeatSchedulerEntry.decode_meta(fields.get("meta"))
        sent = int(meta.get("total_run_count") or 0) > 0
        sent_at = cast(datetime | None, meta.get("last_run_at")) if sent else None
        last_run = (
            LastRun.model_validate_json(fields[LAST_RUN_FIELD])
            if LAST_RUN_FIELD in fields
            else None
        )
        return Schedule(
            record=record,
            next_run=_next_run(record, meta.get("last_run_at"), sent),
            sent_at=sent_at,
            last_run=last_run,
            runs=int(fields.get(RUNS_FIELD, "0")),
        )


def _next_match(schedule: crontab, after: datetime) -> datetime:
    start, delta, _ = schedule.remaining_delta(after)
    return cast(datetime, start + delta).astimezone(UTC)


def _next_run(record: ScheduleRecord, last_run_at: datetime | None, sent: bool) -> datetime | None:
    """When the beat will send it next (a time just past: overdue, sent on its next tick).

    A cron time missed by more than `FIRE_LATE_LIMIT_S` is never sent (the beat's deadline),
    so the next run is then the first match from now. None, shown as unknown, for a stored
    expression the parser refuses today (`fri-mon`, stored before backwards names were
    refused): `schedule list` still shows the entry, so it can be removed.
    """
    if record.at is not None:
        return None if sent else record.at
    assert record.cron is not None
    try:
        schedule = parse_cron(record.cron)
    except ScheduleError:
        return None
    current = now()
    after_last = _next_match(schedule, last_run_at or record.created)
    if (current - after_last).total_seconds() > FIRE_LATE_LIMIT_S:
        return _next_match(schedule, current)
    return after_last


def lateness(record: ScheduleRecord, at: datetime) -> str | None:
    """Why a one-shot firing at `at` is too late to start its evacuation, or None.

    Cron schedules are kept on time by the beat itself (`beat_cron_starting_deadline`).
    """
    if record.at is None:
        return None
    late_s = (at - record.at).total_seconds()
    if late_s <= FIRE_LATE_LIMIT_S:
        return None
    return (
        f"fired {int(late_s)} s after its time {utc_text(record.at)} (no beat ran then?); "
        f"an evacuation starts at most {FIRE_LATE_LIMIT_S} s late"
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
    return Drover(settings).evacuation_spec(**request.model_dump())


# --- the beat ---------------------------------------------------------------------------------


def run_beat(settings: Settings, *, loglevel: str) -> None:
    """Run Celery beat with redbeat on the fleet's Redis until SIGTERM or SIGINT.

    Only the beat holding the lock (`LOCK_KEY`) fires; another one started beside it waits
    for the lock and takes over when the first stops (or `BEAT_LOCK_TIMEOUT_S` after it died).
    Messages are signed like every producer's when `[security] signing` is on.
    """
    if loglevel.upper() not in LOG_LEVELS:
        raise ScheduleError(f"--loglevel {loglevel!r}: one of {', '.join(LOG_LEVELS)}")
    # Fail in one line when Redis is out of reach; redbeat would only log a traceback.
    with redis.Redis.from_url(settings.redis_url) as client:
        client.ping()
    beat_app = make_app(settings)  # registers the signing key when signing is on
    # No retrying: redbeat renews its lock on every tick without it anyway, so a beat that
    # loses Redis exits at its next tick, and its supervisor starts it again.
    beat_app.conf.update(redbeat_config(settings))
    beat_app.Beat(
        scheduler=REDBEAT_SCHEDULER,
        max_interval=BEAT_MAX_INTERVAL_S,
        loglevel=loglevel.upper(),
    ).run()
