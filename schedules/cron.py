"""When a schedule fires: strict cron and --at parsing, the next run, and which of its signed
times a firing answers."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import cast

from celery.schedules import crontab, crontab_parser
from redbeat.schedules import rrule

from config.addresses import shown
from jobs.store import now
from schedules.records import (
    FIRE_EARLY_LIMIT_S,
    FIRE_LATE_LIMIT_S,
    ScheduleError,
    ScheduleRecord,
    utc_text,
)

CRON_FORM = "minute hour day-of-month month day-of-week, in UTC"
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
            return f"{name} takes numbers only, not {shown(text)}"
        return f"{name} {shown(text)} is neither a number nor one of {', '.join(names)}"
    return None if low <= value <= high else f"{name} {value} is outside {low}-{high}"


def _cron_field_problem(
    field: str, name: str, low: int, high: int, names: tuple[str, ...]
) -> str | None:
    for part in field.split(","):
        match = _CRON_PART.match(part)
        if match is None:
            return (
                f"{name} field {shown(field)}: {shown(part)} is not *, N, N-M or a step /N of those"
            )
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
    where = f"--cron {shown(expr)}"
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
    if not day_of_month.startswith("*") and not day_of_week.startswith("*"):
        # Cron runs on a day that matches either field; Celery's crontab only on one that
        # matches both (`0 3 1 * mon`: cron, every 1st and every Monday; Celery, a 1st that
        # is a Monday). Refused rather than run on days other than the operator meant.
        raise ScheduleError(
            f"{where}: restricts both the day of month and the day of week, which cron "
            "reads as either and drover's scheduler as both; keep one (use * in the "
            "other), or add one schedule for each"
        )
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
    """An ISO-8601 time in the future, in UTC to the second; without an offset it is UTC.

    A fraction of a second is refused, not cut: the schedule would fire at another time than
    the one given (a fraction of zero, `.000`, loses nothing and is taken).
    """
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ScheduleError(
            f"--at {shown(text)} is not an ISO-8601 time (e.g. 2030-06-01T03:00:00Z)"
        ) from None
    try:
        when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-14:00 is in the year 10000 in UTC
        raise ScheduleError(
            f"--at {shown(text)} is out of range: in UTC it must fall within the years 1 to 9999"
        ) from None
    if when.microsecond:  # redbeat keeps whole seconds: the fraction would be dropped
        raise ScheduleError(
            f"--at {shown(text)} has a fraction of a second: schedules keep whole seconds"
        )
    current = reference or now()
    if when <= current:
        raise ScheduleError(f"--at {utc_text(when)} is in the past (now {utc_text(current)})")
    return when


def one_shot(when: datetime) -> rrule:
    """An rrule that occurs once, at `when`: redbeat never fires it again afterwards."""
    return rrule("SECONDLY", dtstart=when, count=1)


def _next_match(schedule: crontab, after: datetime) -> datetime:
    start, delta, _ = schedule.remaining_delta(after)
    return cast(datetime, start + delta).astimezone(UTC)


def next_run(record: ScheduleRecord, last_run_at: datetime | None, sent: bool) -> datetime | None:
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


def fire_slot(record: ScheduleRecord, at: datetime) -> datetime | str:
    """The time of the signed schedule that a firing at `at` answers, or why it answers none.

    A firing counts only from `FIRE_EARLY_LIMIT_S` before one of the times the signed `at` or
    `cron` names to `FIRE_LATE_LIMIT_S` after it (the latest such time, for a cron). The
    beat's entry in Redis says when to send, and anyone with a Redis password can rewrite it
    (every minute, every 5 s): the worker goes by the signed record alone.
    """
    if record.at is not None:
        off_s = (at - record.at).total_seconds()
        if off_s > FIRE_LATE_LIMIT_S:
            return (
                f"fired {int(off_s)} s after its time {utc_text(record.at)} (no beat ran "
                f"then?); an evacuation starts at most {FIRE_LATE_LIMIT_S} s late"
            )
        if off_s < -FIRE_EARLY_LIMIT_S:
            return (
                f"fired {int(-off_s)} s before its time {utc_text(record.at)}; a schedule "
                "fires only at the time it was signed for"
            )
        return record.at
    assert record.cron is not None
    try:
        schedule = parse_cron(record.cron)
    except ScheduleError as exc:
        return f"its cron {shown(record.cron)} is refused today: {exc}"
    latest = at + timedelta(seconds=FIRE_EARLY_LIMIT_S)
    slot = _next_match(schedule, at - timedelta(seconds=FIRE_LATE_LIMIT_S + 1))
    if slot > latest:
        return (
            f"fired at {utc_text(at)}, not at a time its cron {shown(record.cron)} ({CRON_FORM})"
            f" names; an evacuation starts at its times only, at most {FIRE_LATE_LIMIT_S} s late"
        )
    while (following := _next_match(schedule, slot)) <= latest:
        slot = following
    return slot
