"""The one shape of every event, whoever writes it: pure steps (a timestamp in one format, the
emitting host, the contract keys), as structlog's processors are. A worker's events pass them
in its chain (config/events.py); a producer or an admission pass builds one with `job_event`.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any

# The keys every event carries (null where a key does not apply, e.g. `phase` of a state change).
CONTRACT_KEYS = ("ts", "event", "job_id", "domain", "src", "dst", "phase", "host")
# Written to a job's stream when events of it were dropped from a full hold (below).
EVENTS_LOST = "events.lost"
# Written to a job's stream when entries no worker wrote had run it out of stream IDs (below).
EVENTS_RECLAIMED = "events.ids_reclaimed"

EventDict = MutableMapping[str, Any]
Processor = Callable[[Any, str, EventDict], EventDict]


def now_ts() -> str:
    """The one timestamp format of events: ISO 8601 in UTC with `+00:00`, as
    `datetime.isoformat()` writes it (and every other time drover stores in Redis)."""
    return datetime.now(UTC).isoformat()


def add_timestamp(_: Any, __: str, event: EventDict) -> EventDict:
    event["ts"] = now_ts()
    return event


def add_host(host: str) -> Processor:
    def processor(_: Any, __: str, event: EventDict) -> EventDict:
        event.setdefault("host", host)
        return event

    return processor


def ensure_contract_keys(_: Any, __: str, event: EventDict) -> EventDict:
    for key in CONTRACT_KEYS:
        event.setdefault(key, None)
    return event


def contract_steps(host: str) -> list[Processor]:
    """The pure steps that give an event its contract shape: the same for every writer."""
    return [add_timestamp, add_host(host), ensure_contract_keys]


def run_steps(steps: Sequence[Processor], event: EventDict) -> EventDict:
    for step in steps:
        event = step(None, "info", event)
    return event


def job_event(name: str, host: str, **fields: Any) -> dict[str, Any]:
    """An event in the contract's shape, for a producer or an admission pass to write straight
    to a job's stream: built by the steps a worker's events go through (`configure`)."""
    return dict(run_steps(contract_steps(host), {"event": name, **fields}))
