"""Event streams: one Redis stream per job (or evacuation), appended to and read in order.

An event appended after its job ended (a late event, a held event flushed after an outage)
never leaves a stream without a time to live: the append and jobs/retention.py's adoption
are one step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import redis
from redis.client import NEVER_DECODE

from jobs.keys import EVENT_FIELD, events_key

if TYPE_CHECKING:
    from redis.client import Pipeline

    from jobs.retention import Retention

EVENT_READ_BATCH = 500
DEFAULT_EVENT_MAXLEN = 10_000
# An entry this far ahead of the clock was not added with an automatic ID (`XADD *` takes
# Redis's clock, or one past the stream's last ID): it was written with an ID of its own.
FUTURE_ID_SLACK_MS = 24 * 3600 * 1000
LAST_POSSIBLE_ID = "18446744073709551615-18446744073709551615"  # Redis's largest stream ID
MS_PER_S = 1000

Event = dict[str, Any]
# Told the stream id of an entry that is no event, and why (the reader says it, once).
Skipped = Callable[[str, str], None]
# Entries as Redis holds them: not decoded, so that one entry that is not UTF-8 costs only
# itself (decoding the reply would fail the whole read).
Rows = list[tuple[bytes, dict[bytes, bytes]]]


class EventBatch(NamedTuple):
    events: list[tuple[str, Event]]
    last: str | None  # the last entry read, an event or skipped; None when none was


class EventStreams:
    retention: Retention

    def __init__(self, client: redis.Redis, *, event_maxlen: int = DEFAULT_EVENT_MAXLEN) -> None:
        self.r = client
        self.event_maxlen = event_maxlen

    def append_event(self, job_id: str, event: Event) -> str:
        with self.r.pipeline(transaction=True) as p:
            self.queue_event(p, job_id, event)
            added, _ = p.execute()
        return str(added)

    def reclaim_ids(self, job_id: str) -> int:
        """Remove the entries of the job's stream written with IDs a day ahead of the clock, and
        set its last ID back to the newest entry left; how many were removed.

        An entry added by hand at the largest ID (anyone with the Redis password can) leaves
        no ID to give the next `XADD *` ("exhausted the last possible ID"): every later event
        of the job was refused, and the job's story stopped where it was written. No worker
        wrote such an entry; the job's own events are all behind it."""
        key = events_key(job_id)
        # This host's clock, not Redis's TIME (no role is granted it): hosts keep time with
        # Redis to seconds (controls need it), and the slack is a day.
        horizon = int(time.time() * MS_PER_S) + FUTURE_ID_SLACK_MS
        rows = cast(Rows, self.r.xrange(key, min=f"{horizon}-0", max="+"))
        ahead = [entry for entry, _ in rows]
        if not ahead:
            return 0
        with self.r.pipeline(transaction=True) as p:
            p.xdel(key, *ahead)
            p.xrevrange(key, count=1)
            _, newest = p.execute()
        self.r.execute_command("XSETID", key, newest[0][0] if newest else "0-1")  # type: ignore[no-untyped-call]
        return len(ahead)

    def append_events(self, items: list[tuple[str, Event]]) -> list[Exception | None]:
        """Append each (job id, event) in one transaction; per event, what Redis refused of
        its writes (None: written). A refused append leaves the others written."""
        bounds = []
        with self.r.pipeline(transaction=True) as p:
            for job_id, event in items:
                start = len(p)
                self.queue_event(p, job_id, event)
                bounds.append((start, len(p)))
            replies = p.execute(raise_on_error=False)
        return [
            next((r for r in replies[a:b] if isinstance(r, Exception)), None) for a, b in bounds
        ]

    def queue_event(self, pipe: Pipeline, job_id: str, event: Event) -> None:
        """Stack the append (and its adoption of the record's time to live) on `pipe`."""
        key = events_key(job_id)
        data = {EVENT_FIELD: json.dumps(event, default=str)}
        pipe.xadd(key, data, maxlen=self.event_maxlen, approximate=True)  # type: ignore[arg-type]
        self.retention.queue_adopt(pipe, job_id, key)

    def read_events(
        self,
        job_id: str,
        after: str = "0-0",
        block_ms: int | None = None,
        *,
        skipped: Skipped | None = None,
    ) -> list[tuple[str, Event]]:
        """Events after stream id `after`; with `block_ms`, wait up to that long for new ones.

        An entry that is no event drover writes is left out (and given to `skipped`)."""
        return self.read_batch(job_id, after, block_ms, skipped=skipped).events

    def read_batch(
        self,
        job_id: str,
        after: str = "0-0",
        block_ms: int | None = None,
        *,
        skipped: Skipped | None = None,
    ) -> EventBatch:
        """`read_events`, and the id of the last entry read, an event or not: a reader that
        goes on from it never reads a skipped entry twice."""
        key = events_key(job_id)
        if after == LAST_POSSIBLE_ID:
            # Read past an entry written by hand at the largest ID: nothing can follow it (and
            # Redis refuses the range after it, which ended every follower with a traceback).
            # A blocking read waits out its time as for a stream with nothing new.
            rows = [] if block_ms is None else self._blocking(key, after, block_ms)
        elif block_ms is None:
            start = f"({after}" if after != "0-0" else "-"
            rows = cast(Rows, self._raw("XRANGE", key, start, "+"))
        else:
            rows = self._blocking(key, after, block_ms)
        events: list[tuple[str, Event]] = []
        for raw_id, fields in rows:
            eid = raw_id.decode()
            try:
                events.append((eid, event_of(fields)))
            except ValueError as exc:
                if skipped is not None:
                    skipped(eid, str(exc))
        return EventBatch(events, rows[-1][0].decode() if rows else None)

    def _blocking(self, key: str, after: str, block_ms: int) -> Rows:
        read = ("XREAD", "COUNT", EVENT_READ_BATCH, "BLOCK", block_ms, "STREAMS", key, after)
        got = cast(list[tuple[bytes, Rows]], self._raw(*read))
        return [row for _, stream_rows in got or [] for row in stream_rows]

    def newest_event_id(self, job_id: str) -> str:
        """The id of the stream's last entry ("0-0" while it has none): read on from it to see
        only what is added after."""
        rows = cast(Rows, self._raw("XREVRANGE", events_key(job_id), "+", "-", "COUNT", 1))
        return rows[0][0].decode() if rows else "0-0"

    def _raw(self, *command: Any) -> Any:
        """The reply to `command` as Redis sent it (bytes: see Rows)."""
        return self.r.execute_command(*command, **{NEVER_DECODE: []})  # type: ignore[no-untyped-call]


def skipped_notice(say: Callable[[str], None], job_id: str) -> Skipped:
    """A `skipped` that says each entry passed over in one line (the CLI's notice: stderr)."""

    def said(entry_id: str, why: str) -> None:
        say(f"job {job_id}: stream entry {entry_id} skipped, not an event drover writes: {why}")

    return said


def event_of(fields: dict[bytes, bytes]) -> Event:
    """The event an entry holds (as drover writes it: a JSON object in its `data` field), or
    ValueError saying what it holds instead. Anyone with the Redis password can add entries."""
    raw = fields.get(EVENT_FIELD.encode())
    if raw is None:
        raise ValueError(f"no {EVENT_FIELD!r} field")
    try:
        event = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{EVENT_FIELD!r} is not JSON ({type(exc).__name__})") from None
    if not isinstance(event, dict):
        raise ValueError(f"{EVENT_FIELD!r} is not a JSON object but {type(event).__name__}")
    return event
