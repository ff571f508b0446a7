"""Structured events: one writer for the job's Redis stream, and the log, of every process.

An event is built by the same pure steps wherever it is emitted: a timestamp in one format,
the emitting host, the contract keys. A worker emits through structlog (`configure`): its
context from the running phase, those steps, then output last: the copy on the job's stream
and the JSON log line. A producer or an admission pass writes one event straight to a job's
stream (`job_event` builds it by the same steps), so every stream holds one shape and one
timestamp format whoever wrote it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from config.event_publisher import (
    FLUSH_INTERVAL_S,
    HELD,
    HOLD_MAX,
    REFUSED,
    EventSink,
    Item,
    StreamPublisher,
)
from config.event_shape import (
    CONTRACT_KEYS,
    EVENTS_LOST,
    EventDict,
    Processor,
    contract_steps,
    job_event,
    now_ts,
    run_steps,
)

__all__ = [
    "CONTRACT_KEYS",
    "EVENTS_LOST",
    "StreamPublisher",
    "batched",
    "configure",
    "get_logger",
    "job_event",
    "now_ts",
    "run_steps",
]

# The log level structlog adds: not part of the event on the stream.
LEVEL_KEY = "level"
# The events of a `batched()` step, in the order they were logged (None: not in one).
_batch: ContextVar[list[Item] | None] = ContextVar("drover_event_batch", default=None)
_output: StreamAndLog | None = None


@contextmanager
def batched() -> Iterator[None]:
    """Events logged inside go to their streams together, in one round trip, at the end.

    For a step that logs several events at once and waits on nothing while it does (the
    verdicts of a phase's pre-checks): each event on its own costs a round trip to Redis. Log
    lines are written at once; the streams get the events at the step's end, in order, held
    or refused as any event is (StreamPublisher).
    """
    items: list[Item] = []
    token = _batch.set(items)
    try:
        yield
    finally:
        _batch.reset(token)
        publisher = _output.publisher if _output is not None else None
        if items and publisher is not None:
            publisher.send_many(items)


class StreamAndLog:
    """The chain's output, its last step: the event onto its job's stream, then its JSON line.

    Events without a `job_id` are log lines only. Writing never fails the caller: the log line
    of an event that could not be written yet says `stream_held`, and the event itself reaches
    the stream once Redis is back (StreamPublisher); the line of one that its job's stream
    refused says `stream_lost` (what Redis said), and the stream has only the count of those.
    An event of a `batched()` step is written (or held) at the step's end: its line, written
    before that, says neither.
    """

    def __init__(self, publisher: StreamPublisher | None) -> None:
        import structlog

        self.publisher = publisher
        self.render = structlog.processors.JSONRenderer(default=str)

    def __call__(self, logger: Any, method: str, event: EventDict) -> str:
        job_id = event.get("job_id")
        if self.publisher is not None and job_id:
            copy = {k: v for k, v in event.items() if k != LEVEL_KEY}
            if (batch := _batch.get()) is not None:
                batch.append((str(job_id), copy))
                return str(self.render(logger, method, event))
            outcome, refused = self.publisher.send(str(job_id), copy)
            if outcome == HELD:
                event["stream_held"] = True
            elif outcome == REFUSED:
                event["stream_lost"] = refused
        return str(self.render(logger, method, event))


def configure(
    host: str,
    sink: EventSink | None,
    *,
    stream: Any = None,
    hold_max: int = HOLD_MAX,
    flush_interval: float = FLUSH_INTERVAL_S,
    observers: Sequence[Processor] = (),
) -> None:
    """Set the process-wide chain: call once when a worker or producer starts.

    `sink` is where job events go (a store that fails at once, see StreamPublisher);
    `hold_max` and `flush_interval` bound and pace the hold of events during an outage.
    `observers` see every event in its contract shape just before the output (a worker's
    metrics, worker/metrics_registry.py); each returns the event as it came.
    """
    import structlog  # here and in get_logger: reading a job's events needs no logger

    publisher = (
        None
        if sink is None
        else StreamPublisher(sink, host, limit=hold_max, flush_interval=flush_interval)
    )
    global _output
    _output = StreamAndLog(publisher)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *contract_steps(host),
            *observers,
            _output,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        # WriteLogger writes a line and its newline in one call; PrintLogger's print() writes
        # them apart, and another process appending to the same log (Celery's own logger, a
        # pool child) could land between them, leaving a JSON line with text after it.
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger() -> Any:
    import structlog

    return structlog.get_logger("drover")
