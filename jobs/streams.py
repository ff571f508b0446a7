"""Event streams: one Redis stream per job (or evacuation), appended to and read in order.

An event appended after its job ended (a late event, a held event flushed after an outage)
never leaves a stream without a time to live: the append and jobs/retention.py's adoption
are one step.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

import redis

from jobs.keys import EVENT_FIELD, events_key

if TYPE_CHECKING:
    from redis.client import Pipeline

    from jobs.retention import Retention

EVENT_READ_BATCH = 500
DEFAULT_EVENT_MAXLEN = 10_000

Event = dict[str, Any]


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

    def queue_event(self, pipe: Pipeline, job_id: str, event: Event) -> None:
        """Stack the append (and its adoption of the record's time to live) on `pipe`."""
        key = events_key(job_id)
        data = {EVENT_FIELD: json.dumps(event, default=str)}
        pipe.xadd(key, data, maxlen=self.event_maxlen, approximate=True)  # type: ignore[arg-type]
        self.retention.queue_adopt(pipe, job_id, key)

    def read_events(
        self, job_id: str, after: str = "0-0", block_ms: int | None = None
    ) -> list[tuple[str, Event]]:
        """Events after stream id `after`; with `block_ms`, wait up to that long for new ones."""
        if block_ms is None:
            start = f"({after}" if after != "0-0" else "-"
            rows = cast(
                list[tuple[str, dict[str, str]]], self.r.xrange(events_key(job_id), min=start)
            )
            return [(eid, json.loads(f[EVENT_FIELD])) for eid, f in rows]
        got = cast(
            list[tuple[str, list[tuple[str, dict[str, str]]]]],
            self.r.xread({events_key(job_id): after}, block=block_ms, count=EVENT_READ_BATCH),
        )
        return [(eid, json.loads(f[EVENT_FIELD])) for _, rows in got for eid, f in rows]
