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
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import redis
from redis.exceptions import ClusterDownError, OutOfMemoryError, ReadOnlyError, TryAgainError

# The keys every event carries (null where a key does not apply, e.g. `phase` of a state change).
CONTRACT_KEYS = ("ts", "event", "job_id", "domain", "src", "dst", "phase", "host")
# Written to a job's stream when events of it were dropped from a full hold (below).
EVENTS_LOST = "events.lost"
# Defaults for a chain configured without the tunables (tools, tests).
HOLD_MAX = 10_000
FLUSH_INTERVAL_S = 0.5
# The log level structlog adds: not part of the event on the stream.
LEVEL_KEY = "level"

EventDict = MutableMapping[str, Any]
Processor = Callable[[Any, str, EventDict], EventDict]


class EventSink(Protocol):
    def append_event(self, job_id: str, event: dict[str, Any]) -> str: ...


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


# A refusal about the server as a whole, not the stream written to, passes (memory freed, a
# replica promoted, a script ended, the disk writable again): it is held through as an outage.
# Codes redis-py keeps in the message, and classes it raises (without the code) for others.
PASSING_CODES = frozenset({"MISCONF", "BUSY", "NOREPLICAS"})
PASSING_CLASSES = (OutOfMemoryError, ReadOnlyError, TryAgainError, ClusterDownError)
# What publishing an event did: written now, held through an outage, or refused by its stream.
WRITTEN, HELD, REFUSED = "written", "held", "refused"
REASON_MAX = 200


def refusal(exc: redis.RedisError) -> str | None:
    """What Redis said when the job's stream refused a write for good (its key of another
    type, a top ID it cannot go past, no permission on it: anyone with the Redis password can
    do that to one job's stream); None when Redis is away or refuses every write for now."""
    if not isinstance(exc, redis.ResponseError) or isinstance(exc, PASSING_CLASSES):
        return None
    said = str(exc).rpartition("caused error: ")[2]  # a pipeline's names the command first
    passing = said.split(" ", 1)[0] in PASSING_CODES
    return None if passing else " ".join(said.split())[:REASON_MAX]


class StreamPublisher:
    """Writes job events to their streams, and holds them while Redis cannot be written.

    A Redis outage must not cost a job its story: the migration it describes goes on (libvirt
    does not need Redis), so the events of the outage are held in memory, in the order they
    were emitted, and written by a background thread as soon as Redis answers again. While
    anything is held, new events queue behind it, so every stream keeps its order (and a
    job's terminal event stays its last). The hold is bounded (`limit`): past it the oldest
    event is dropped, and the job's stream gets an `events.lost` event with the count, ahead
    of the events that were kept, instead of a silent gap.

    A stream that refuses a write for good (`refusal`) is its job's problem, no outage: the
    event is dropped at once (no other job's waits), and the job owes its stream an
    `events.lost` note, written ahead of its next event that the stream takes.

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
        # Per job: how many of its events were dropped, and why, until its stream is told
        self.lost: Counter[str] = Counter()
        self.lost_why: dict[str, str] = {}
        self._lock = threading.Lock()
        self._flusher: threading.Thread | None = None

    def publish(self, job_id: str, event: dict[str, Any]) -> bool:
        """Write `event` to the job's stream now (True), or not (False: held, or refused)."""
        return self.send(job_id, event)[0] == WRITTEN

    def send(self, job_id: str, event: dict[str, Any]) -> tuple[str, str | None]:
        """Write `event` to the job's stream now (WRITTEN), hold it through an outage (HELD),
        or drop it when its stream refuses it (REFUSED, and what Redis said)."""
        with self._lock:
            if not self.held:
                try:
                    self._write(job_id, event)
                    return WRITTEN, None
                except redis.RedisError as exc:
                    why = refusal(exc)
                    if why is not None:
                        self._count_lost(job_id, why)
                        return REFUSED, why
            if len(self.held) >= self.limit:
                dropped, _ = self.held.popleft()
                self._count_lost(dropped, None)
            self.held.append((job_id, event))
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_until_done, name="event-flush", daemon=True
                )
                self._flusher.start()
            return HELD, None

    def flush(self) -> bool:
        """Write what is held, oldest first, until Redis fails again; True once all is out
        (events that their streams refused are dropped on the way, and counted)."""
        with self._lock:
            return self._flush_locked()

    def _flush_locked(self) -> bool:
        try:
            for job_id in list(self.lost):
                self._write_or_pass(job_id, None)
            while self.held:
                self._write_or_pass(*self.held[0])
                self.held.popleft()
        except redis.RedisError:
            return False
        return True

    def _write_or_pass(self, job_id: str, event: dict[str, Any] | None) -> None:
        """The job's event (None: the note of its lost events alone); one that its stream
        refuses is counted lost and passed over (a refused note stays owed), an outage raised."""
        try:
            self._write(job_id, event)
        except redis.RedisError as exc:
            why = refusal(exc)
            if why is None:
                raise
            if event is not None:
                self._count_lost(job_id, why)

    def _write(self, job_id: str, event: dict[str, Any] | None) -> None:
        """The note of the job's events lost before `event` if one is owed, then `event`."""
        if self.lost[job_id]:
            self._write_lost(job_id)
        if event is not None:
            self.sink.append_event(job_id, event)

    def _write_lost(self, job_id: str) -> None:
        lost = job_event(EVENTS_LOST, self.host, job_id=job_id, count=self.lost[job_id])
        lost["reason"] = self.lost_why[job_id]
        self.sink.append_event(job_id, lost)
        del self.lost[job_id], self.lost_why[job_id]

    def _count_lost(self, job_id: str, refused: str | None) -> None:
        """One more event of the job dropped: its stream `refused` it, or a full hold (None)."""
        self.lost[job_id] += 1
        full = f"a Redis outage outlasted the hold of {self.limit} events"
        self.lost_why.setdefault(job_id, f"its stream refused: {refused}" if refused else full)

    def _flush_until_done(self) -> None:
        while True:
            time.sleep(self.flush_interval)
            with self._lock:
                if self._flush_locked():
                    self._flusher = None
                    return


class StreamAndLog:
    """The chain's output, its last step: the event onto its job's stream, then its JSON line.

    Events without a `job_id` are log lines only. Writing never fails the caller: the log line
    of an event that could not be written yet says `stream_held`, and the event itself reaches
    the stream once Redis is back (StreamPublisher); the line of one that its job's stream
    refused says `stream_lost` (what Redis said), and the stream has only the count of those.
    """

    def __init__(self, publisher: StreamPublisher | None) -> None:
        import structlog

        self.publisher = publisher
        self.render = structlog.processors.JSONRenderer(default=str)

    def __call__(self, logger: Any, method: str, event: EventDict) -> str:
        job_id = event.get("job_id")
        if self.publisher is not None and job_id:
            copy = {k: v for k, v in event.items() if k != LEVEL_KEY}
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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *contract_steps(host),
            *observers,
            StreamAndLog(publisher),
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
