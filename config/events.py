"""Structured events: one structlog processor chain for logs and the job's Redis stream.

Every event a worker emits with a job bound goes through the same small steps: context from
the running phase, the contract keys, a timestamp, publication to the job's stream, then
JSON for the log. Producers follow the stream; the worker log keeps the same lines.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

import redis
import structlog

# The keys every event carries (null where a key does not apply, e.g. `phase` of a state change).
CONTRACT_KEYS = ("ts", "event", "job_id", "domain", "src", "dst", "phase", "host")

EventDict = MutableMapping[str, Any]
Processor = Callable[[Any, str, EventDict], EventDict]


class EventSink(Protocol):
    def append_event(self, job_id: str, event: dict[str, Any]) -> str: ...


def job_event(name: str, host: str, **fields: Any) -> dict[str, Any]:
    """An event in the contract's shape, written by a producer or an admission pass directly
    to a job's stream (a worker's go through the processor chain below)."""
    from datetime import UTC, datetime

    event: dict[str, Any] = dict.fromkeys(CONTRACT_KEYS)
    event.update(ts=datetime.now(UTC).isoformat(), event=name, host=host, **fields)
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


def publish_to_job_stream(sink: EventSink | None) -> Processor:
    """Copy events that belong to a job onto that job's stream; never fail the caller."""

    def processor(_: Any, __: str, event: EventDict) -> EventDict:
        job_id = event.get("job_id")
        if sink is not None and job_id:
            try:
                sink.append_event(str(job_id), {k: v for k, v in event.items() if k != "level"})
            except redis.RedisError as exc:
                event["stream_error"] = str(exc)
        return event

    return processor


def configure(host: str, sink: EventSink | None, *, stream: Any = None) -> None:
    """Set the process-wide chain: call once when a worker or producer starts."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            add_host(host),
            ensure_contract_keys,
            publish_to_job_stream(sink),
            structlog.processors.JSONRenderer(default=str),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger() -> Any:
    return structlog.get_logger("drover")
