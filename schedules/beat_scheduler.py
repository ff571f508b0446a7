"""redbeat's scheduler as `drover beat` runs it: each entry read and checked on its own.

redbeat reads an entry's `definition` and `meta` as they stand and fails on the first it
cannot use: a `meta` of `{"last_run_at": "yesterday"}` (anyone with the Redis password can
write one) raised AttributeError in its `is_due`, out of the beat's tick, and the beat
exited; its supervisor started it again onto the same entry, so no schedule ever fired.
Here an entry drover cannot read, or one that is not what `drover schedule add` writes (the
beat signs what it sends), is skipped with one log line per entry per run, and every other
entry is scheduled as before. Redis errors still end the tick (the beat exits, its
supervisor starts it again, as schedules/beat.py says).
"""

from __future__ import annotations

from typing import Any

from celery.schedules import BaseSchedule
from celery.utils.log import get_logger
from redbeat.decoder import to_timestamp
from redbeat.schedulers import RedBeatScheduler, RedBeatSchedulerEntry, ensure_conf, get_redis

from jobs.keys import SCHEDULE_PREFIX
from schedules.entries import complaint, entry_meta, entry_name
from schedules.records import SCHEDULED_EVACUATION_TASK

logger = get_logger("celery.beat")  # redbeat's own: its lines land in the beat's log
# What a definition drover writes holds (store.py `add_evacuation`), and its options.
DEFINITION_KEYS = frozenset({"name", "task", "args", "kwargs", "options", "schedule", "enabled"})
OPTION_KEYS = frozenset({"queue", "expires"})


class UnreadableEntry(Exception):
    """An entry the beat cannot use; the message is one line (not a KeyError: redbeat takes
    those for an entry gone, and drops it from its index)."""


def _problem(key: str, fields: Any) -> str | None:
    """Why a decoded definition is not one drover writes for the entry at `key`, or None."""
    if not isinstance(fields, dict) or not set(fields) <= DEFINITION_KEYS:
        return "definition: not drover's fields"
    schedule_id = key.removeprefix(SCHEDULE_PREFIX)
    options = fields.get("options")
    checks = (
        (fields.get("name") == schedule_id, "name is not the entry's"),
        (fields.get("task") == SCHEDULED_EVACUATION_TASK, "task is not drover's"),
        (fields.get("args") == [schedule_id], "args are not the schedule's id"),
        (fields.get("kwargs") in (None, {}), "kwargs given"),
        (isinstance(options, dict) and set(options) <= OPTION_KEYS, "options are not drover's"),
        (isinstance(fields.get("schedule"), BaseSchedule), "schedule is not a schedule"),
        (isinstance(fields.get("enabled", True), bool), "enabled is not true or false"),
    )
    return next((f"definition: {why}" for ok, why in checks if not ok), None)


class DroverEntry(RedBeatSchedulerEntry):  # type: ignore[misc]
    """An entry read as redbeat reads it, then checked: UnreadableEntry when it cannot be."""

    @classmethod
    def from_key(cls, key: str, app: Any = None) -> DroverEntry:
        ensure_conf(app)
        with get_redis(app).pipeline() as pipe:  # Redis errors go up as they are
            pipe.hget(key, "definition")
            pipe.hget(key, "meta")
            definition, meta = pipe.execute()
        if not definition:
            raise KeyError(key)  # gone: redbeat drops it from the index, as it always did
        try:
            return cls._decoded(key, definition, meta, app)
        except UnreadableEntry:
            raise
        except Exception as exc:  # redbeat's decoder, Celery's schedules: nothing of Redis
            raise UnreadableEntry(complaint(exc)) from None

    @classmethod
    def _decoded(cls, key: str, definition: str, meta: str | None, app: Any) -> DroverEntry:
        try:
            fields = cls.decode_definition(definition)
        except Exception as exc:  # redbeat's decoder: Celery's and dateutil's errors too
            raise UnreadableEntry(f"definition: {complaint(exc)}") from None
        problem = _problem(key, fields)
        if problem is not None:
            raise UnreadableEntry(problem)
        try:
            last_run_at, runs = entry_meta(meta)
        except ValueError as exc:
            raise UnreadableEntry(f"meta: {exc}") from None
        entry = cls(app=app, total_run_count=runs, **fields)
        entry.last_run_at = last_run_at  # Celery's default (now) would skip its first run
        # What redbeat computes to send it and to file it again: failing there, redbeat would
        # log a traceback at every tick.
        entry.is_due()
        _ = entry.score
        return entry


class DroverScheduler(RedBeatScheduler):  # type: ignore[misc]
    """redbeat's scheduler, skipping (and saying once per run) what it cannot read."""

    Entry = DroverEntry

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.skipped: set[str] = set()  # entries said to be skipped, by key, this run
        super().__init__(*args, **kwargs)

    def skip(self, key: str, reason: str) -> None:
        if key not in self.skipped:
            self.skipped.add(key)
            logger.warning(
                "beat: skipping %s: its entry cannot be read: %s; the other schedules go on "
                "(drover schedule remove ID removes it)",
                entry_name(key),
                reason,
            )

    @property
    def schedule(self) -> dict[str, Any]:
        """The entries due now or within the next interval, as redbeat selects them, each
        read on its own (redbeat's property, but for the entries it cannot read)."""
        conf = self.app.redbeat_conf
        max_due_at = to_timestamp(self.app.now())
        client = get_redis(self.app)
        with client.pipeline() as pipe:
            pipe.zrangebyscore(conf.schedule_key, 0, max_due_at)
            # the next one after now, for the sleep until the next tick
            pipe.zrangebyscore(
                conf.schedule_key,
                f"({max_due_at}",
                max_due_at + self.max_interval,
                start=0,
                num=1,
            )
            due, maybe_due = pipe.execute()
        entries: dict[str, Any] = {}
        for key in due + maybe_due:
            try:
                entry = self.Entry.from_key(key, app=self.app)
            except KeyError:
                logger.warning("beat: Failed to load %s, removing", key)
                client.zrem(conf.schedule_key, key)
                continue
            except UnreadableEntry as exc:
                self.skip(key, str(exc))
                continue
            self.skipped.discard(key)  # readable again: said again if it breaks again
            entries[entry.name] = entry
        return entries
