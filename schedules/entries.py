"""Schedule entries read back from Redis, each on its own: one drover cannot read is left out
and said, never a failure of the whole list (`drover schedule list`, the fleet exporter) or
of the beat (schedules/beat_scheduler.py).

An entry is a redbeat hash: redbeat's `definition` and `meta`, drover's record and last run
beside them (schedules/records.py). Anyone with the Redis password can write any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TypeVar, cast

import redis
from pydantic import ValidationError
from redbeat.schedulers import RedBeatSchedulerEntry

from jobs.keys import SCHEDULE_INDEX, SCHEDULE_PREFIX, schedule_entry_key
from jobs.record import first_complaint
from schedules.cron import next_run
from schedules.records import (
    LAST_RUN_FIELD,
    RECORD_FIELD,
    RUNS_FIELD,
    LastRun,
    Schedule,
    ScheduleRecord,
    UnreadableSchedule,
)

T = TypeVar("T")
# What reading an entry drover did not write can raise, besides a model refusing it.
DECODE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError)
NAME_CHARS = 40  # of an entry's name in a message (the key is whatever Redis holds)
COMPLAINT_CHARS = 200


def read_schedules(
    r: redis.Redis, index_key: str = SCHEDULE_INDEX, *, unreadable: list[str] | None = None
) -> list[Schedule]:
    """Every schedule in redbeat's index, oldest first, in two round trips: `drover schedule
    list` and the fleet exporter (on a client of its own, with its timeouts) read the same.

    With `unreadable`, an entry drover cannot read is left out and its one-line reason added
    there (one entry written by hand must not hide every other schedule); without it,
    UnreadableSchedule is raised."""
    keys = cast(list[str], r.zrange(index_key, 0, -1))
    with r.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
        rows = cast(list[dict[str, str] | Exception], pipe.execute(raise_on_error=False))
    found: list[Schedule] = []
    for key, row in zip(keys, rows, strict=True):
        try:
            if isinstance(row, redis.ResponseError):  # a key of another type than a hash
                raise UnreadableSchedule(f"{entry_name(key)}: its entry cannot be read: {row}")
            if isinstance(row, Exception):
                raise row
            schedule = schedule_from_fields(row, key=key)
        except UnreadableSchedule as exc:
            if unreadable is None:
                raise
            unreadable.append(str(exc))
            continue
        if schedule is not None:
            found.append(schedule)
    return sorted(found, key=lambda s: (s.record.created, s.id))


def printable(text: str) -> str:
    """`text` on one line: a control character (a newline in a key) escaped as repr does."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def entry_name(key: str) -> str:
    """An entry as a message names it: `schedule ID`, shortened, on one line."""
    name = key.removeprefix(SCHEDULE_PREFIX)
    return f"schedule {printable(name[:NAME_CHARS])}{'...' if len(name) > NAME_CHARS else ''}"


def schedule_from_fields(fields: dict[str, str], *, key: str) -> Schedule | None:
    """A schedule from the hash of its entry at `key`; None for an entry that is not drover's;
    UnreadableSchedule, one line naming the entry and the field, for one drover cannot read
    (a field that is not what drover or redbeat writes, a record naming another entry)."""
    if RECORD_FIELD not in fields:
        return None
    try:
        return _schedule(fields, key)
    except ValueError as exc:
        raise UnreadableSchedule(f"{entry_name(key)}: its entry cannot be read: {exc}") from None


def complaint(exc: BaseException) -> str:
    """One short line for an error: pydantic's first complaint, or the error's first line."""
    if isinstance(exc, ValidationError):
        text = first_complaint(exc)
    else:
        text = (str(exc).splitlines() or [""])[0] or type(exc).__name__
    return printable(text[:COMPLAINT_CHARS])


def _field(name: str, read: Callable[[], T]) -> T:
    """`read()`; a ValueError of one line, prefixed with the field, for whatever it raised."""
    try:
        return read()
    except (*DECODE_ERRORS, ValidationError) as exc:
        raise ValueError(f"{name}: {complaint(exc)}") from None


def record_from(raw: str, key: str) -> ScheduleRecord:
    """drover's record of the entry at `key`; UnreadableSchedule, one line, for one drover
    cannot read or one naming another entry (`remove` and a firing would act on that one)."""
    try:
        return _record(raw, key)
    except ValueError as exc:
        raise UnreadableSchedule(f"{entry_name(key)}: its entry cannot be read: {exc}") from None


def _record(raw: str, key: str) -> ScheduleRecord:
    record = _field(RECORD_FIELD, lambda: ScheduleRecord.model_validate_json(raw))
    if schedule_entry_key(record.id) != key:
        raise ValueError(f"{RECORD_FIELD}: its record is for schedule {record.id}")
    return record


def _schedule(fields: dict[str, str], key: str) -> Schedule:
    record = _record(fields[RECORD_FIELD], key)
    last_run_at, sent = _field("meta", lambda: entry_meta(fields.get("meta")))
    last_run = (
        _field(LAST_RUN_FIELD, lambda: LastRun.model_validate_json(fields[LAST_RUN_FIELD]))
        if LAST_RUN_FIELD in fields
        else None
    )
    runs = _field(RUNS_FIELD, lambda: _count(fields.get(RUNS_FIELD, "0")))
    return Schedule(
        record=record,
        next_run=_field("meta", lambda: next_run(record, last_run_at, sent > 0)),
        sent_at=last_run_at if sent > 0 else None,
        last_run=last_run,
        runs=runs,
    )


def _count(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(f"{raw[:20]!r} is not a count")
    return int(raw)


def entry_meta(raw: str | None) -> tuple[datetime | None, int]:
    """redbeat's `meta` field of an entry: its last run (a time with an offset, or None) and
    how many times the beat sent it; ValueError, one line, for anything else."""
    try:
        meta = RedBeatSchedulerEntry.decode_meta(raw)
    except Exception as exc:  # redbeat's decoder raises Celery's and dateutil's errors too
        raise ValueError(complaint(exc)) from None
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    last = meta.get("last_run_at")
    if last is not None and not (isinstance(last, datetime) and last.utcoffset() is not None):
        raise ValueError("last_run_at is not a time with an offset")
    count = meta.get("total_run_count") or 0
    if type(count) is not int or count < 0:
        raise ValueError("total_run_count is not a count")
    return last, count
