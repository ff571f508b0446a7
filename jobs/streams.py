"""Event streams: one Redis stream per job (or evacuation), appended to and read in order."""

from __future__ import annotations

import json
from typing import Any, cast

import redis

from jobs.keys import EVENT_FIELD, events_key

EVENT_READ_BATCH = 500
DEFAULT_EVENT_MAXLEN = 10_000

Event = dict[str, Any]


class EventStreams:
    def __init__(self, client: redis.Redis, *, event_maxlen: int = DEFAULT_EVENT_MAXLEN) -> None:
        self.r = client
        self.event_maxlen = event_maxlen

    def append_event(self, job_id: str, event: Event) -> str:
        return str(
            self.r.xadd(
                events_key(job_id),
                {EVENT_FIELD: json.dumps(event, default=str)},
                maxlen=self.event_maxlen,
                approximate=True,
            )
        )

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
