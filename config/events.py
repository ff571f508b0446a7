"""Structured events: one structlog processor chain for logs and the job's Redis stream.

Every event a worker emits with a job bound goes through the same small steps: context from
the running phase, the contract keys, a timestamp, publication to the job's stream, then
JSON for the log. Producers follow the stream; the worker log keeps the same lines.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

import redis
import structlog

# The keys every event carries (null where a key does not apply, e.g. `phase` of a state change).
CONTRACT_KEYS = ("ts", "event", "job_id", "domain", "src", "dst", "phase", "host")
# Written to a job's stream when events of it were dropped from a full hold (below).
EVENTS_LOST = "events.lost"
# Defaults for a chain configured without the tunables (tools, tests).
HOLD_MAX = 10_000
FLUSH_INTERVAL_S = 0.5

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


class StreamPublisher:
    """Writes job events to their streams, and holds them while Redis cannot be written.

    A Redis outage must not cost a job its story: the migration it describes goes on (libvirt
    does not need Redis), so the events of the outage are held in memory, in the order they
    were emitted, and written by a background thread as soon as Redis answers again. While
    anything is held, new events queue behind it, so every stream keeps its order (and a
    job's terminal event stays its last). The hold is bounded (`limit`): past it the oldest
    event is dropped, and the job's stream gets an `events.lost` event with the count, ahead
    of the events that were kept, instead of a silent gap.

    `sink` should fail at once when Redis is away (JobStore.without_retry): one that waits
    out an outage would stall every thread that logs.
    """

    def __init__(
        self,
        sink: EventSink,
        host: str,
        *,
        limit: int = HOLD_MAX,
        flush_interval: float = FLUSH_INTERVAL_S,
    ) -> None:
        self.sink = sink
        self.host = host
        self.limit = limit
        self.flush_interval = flush_interval
        self.held: deque[tuple[str, dict[str, Any]]] = deque()
        self.lost: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._flusher: threading.Thread | None = None

    def publish(self, job_id: str, event: dict[str, Any]) -> bool:
        """Write `event` to the job's stream now (True), or hold it for later (False)."""
        with self._lock:
            if not self.held and not self.lost:
                try:
                    self.sink.append_event(job_id, event)
                    return True
                except redis.RedisError:
                    pass
            if len(self.held) >= self.limit:
                dropped, _ = self.held.popleft()
                self.lost[dropped] += 1
            self.held.append((job_id, event))
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_until_done, name="event-flush", daemon=True
                )
                self._flusher.start()
            return False

    def flush(self) -> bool:
        """Write what is held, oldest first, until Redis fails again; True once all is out."""
        with self._lock:
            return self._flush_locked()

    def _flush_locked(self) -> bool:
        try:
            for job_id, count in list(self.lost.items()):
                lost = job_event(EVENTS_LOST, self.host, job_id=job_id, count=count)
                lost["reason"] = f"a Redis outage outlasted the hold of {self.limit} events"
                self.sink.append_event(job_id, lost)
                del self.lost[job_id]
            while self.held:
                job_id, event = self.held[0]
                self.sink.append_event(job_id, event)
                self.held.popleft()
        except redis.RedisError:
            return False
        return True

    def _flush_until_done(self) -> None:
        while True:
            time.sleep(self.flush_interval)
            with self._lock:
                if self._flush_locked():
                    self._flusher = None
                    return


def publish_to_job_stream(publisher: StreamPublisher | None) -> Processor:
    """Copy events that belong to a job onto that job's stream; never fail the caller.

    The log line of an event that could not be written yet says `stream_held`; the event
    itself reaches the stream once Redis is back (StreamPublisher).
    """

    def processor(_: Any, __: str, event: EventDict) -> EventDict:
        job_id = event.get("job_id")
        if publisher is not None and job_id:
            copy = {k: v for k, v in event.items() if k != "level"}
            if not publisher.publish(str(job_id), copy):
                event["stream_held"] = True
        return event

    return processor


def configure(
    host: str,
    sink: EventSink | None,
    *,
    stream: Any = None,
    hold_max: int = HOLD_MAX,
    flush_interval: float = FLUSH_INTERVAL_S,
) -> None:
    """Set the process-wide chain: call once when a worker or producer starts.

    `sink` is where job events go (a store that fails at once, see StreamPublisher);
    `hold_max` and `flush_interval` bound and pace the hold of events during an outage.
    """
    publisher = (
        None
        if sink is None
        else StreamPublisher(sink, host, limit=hold_max, flush_interval=flush_interval)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            add_host(host),
            ensure_contract_keys,
            publish_to_job_stream(publisher),
            structlog.processors.JSONRenderer(default=str),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger() -> Any:
    return structlog.get_logger("drover")
