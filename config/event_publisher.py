"""Writing job events to their Redis streams, and holding them while Redis cannot be written.

A worker's chain ends here (config/events.py): each event is written as it is logged, or, in
a `batched()` step, with the others of that step in one round trip at its end.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, deque
from typing import Any, Protocol, runtime_checkable

import redis
from redis.exceptions import ClusterDownError, OutOfMemoryError, ReadOnlyError, TryAgainError

from config.event_shape import EVENTS_LOST, EVENTS_RECLAIMED, job_event

HOLD_MAX = 10_000
FLUSH_INTERVAL_S = 0.5

Item = tuple[str, dict[str, Any]]  # a job id and one of its events


class EventSink(Protocol):
    def append_event(self, job_id: str, event: dict[str, Any]) -> str: ...


@runtime_checkable
class ReclaimingSink(Protocol):
    """A sink that can give a stream run out of IDs its IDs back (jobs/streams.py)."""

    def reclaim_ids(self, job_id: str) -> int: ...


@runtime_checkable
class BatchSink(Protocol):
    """A sink that writes several events in one round trip (jobs/streams.py)."""

    def append_events(self, items: list[Item]) -> list[Exception | None]: ...


# A refusal about the server as a whole, not the stream written to, passes (memory freed, a
# replica promoted, a script ended, the disk writable again): it is held through as an outage.
# Codes redis-py keeps in the message, and classes it raises (without the code) for others.
PASSING_CODES = frozenset({"MISCONF", "BUSY", "NOREPLICAS"})
PASSING_CLASSES = (OutOfMemoryError, ReadOnlyError, TryAgainError, ClusterDownError)
# What Redis says when a stream's last ID is the largest there is (written so by hand).
EXHAUSTED = "exhausted the last possible ID"


def exhausted(exc: Exception | None) -> bool:
    """Whether `exc` is a stream's refusal for want of IDs (jobs/streams.py `reclaim_ids`)."""
    return isinstance(exc, redis.ResponseError) and EXHAUSTED in str(exc)


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
        self.held: deque[Item] = deque()
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
            return self._send_locked(job_id, event)

    def send_many(self, items: list[Item]) -> None:
        """Write the events in one round trip when the sink can and nothing is held or owed
        (a note of lost events goes ahead of its job's next event); else one by one. Within
        the one round trip, an event its stream refuses is dropped and counted, one Redis
        refuses for now is held, in order; the others are written."""
        with self._lock:
            owed = self.held or any(self.lost[job_id] for job_id, _ in items)
            errors: list[Exception | None] | None = None
            if not owed and isinstance(self.sink, BatchSink):
                with contextlib.suppress(redis.RedisError):  # away, or the step refused whole
                    errors = self.sink.append_events(items)
            if errors is None:  # one by one, as without a batch
                for job_id, event in items:
                    self._send_locked(job_id, event)
                return
            for (job_id, event), exc in zip(items, errors, strict=True):
                if exc is None:
                    continue
                if exhausted(exc):  # its IDs given back, then written alone, in order
                    self._send_locked(job_id, event)
                    continue
                why = refusal(exc) if isinstance(exc, redis.RedisError) else str(exc)
                if why is not None:
                    self._count_lost(job_id, why)
                else:
                    self._hold(job_id, event)

    def _send_locked(self, job_id: str, event: dict[str, Any]) -> tuple[str, str | None]:
        if not self.held:
            try:
                self._write(job_id, event)
                return WRITTEN, None
            except redis.RedisError as exc:
                why = refusal(exc)
                if why is not None:
                    self._count_lost(job_id, why)
                    return REFUSED, why
        self._hold(job_id, event)
        return HELD, None

    def _hold(self, job_id: str, event: dict[str, Any]) -> None:
        """Keep the event for the flusher, behind what is held (the oldest dropped when full)."""
        if len(self.held) >= self.limit:
            dropped, _ = self.held.popleft()
            self._count_lost(dropped, None)
        self.held.append((job_id, event))
        if self._flusher is None:
            self._flusher = threading.Thread(
                target=self._flush_until_done, name="event-flush", daemon=True
            )
            self._flusher.start()

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
        """The note of the job's events lost before `event` if one is owed, then `event`; a
        stream run out of IDs has them given back first (and says so), then is written."""
        try:
            self._write_once(job_id, event)
        except redis.ResponseError as exc:
            if not (exhausted(exc) and self._reclaimed(job_id)):
                raise
            self._write_once(job_id, event)

    def _write_once(self, job_id: str, event: dict[str, Any] | None) -> None:
        if self.lost[job_id]:
            self._write_lost(job_id)
        if event is not None:
            self.sink.append_event(job_id, event)

    def _reclaimed(self, job_id: str) -> bool:
        if not isinstance(self.sink, ReclaimingSink):
            return False
        removed = self.sink.reclaim_ids(job_id)
        if removed:
            note = job_event(EVENTS_RECLAIMED, self.host, job_id=job_id, count=removed)
            note["reason"] = (
                f"{removed} entries written with IDs a day or more ahead of the clock had run "
                "the stream out of IDs: removed, and the events after them written"
            )
            self.sink.append_event(job_id, note)
        return removed > 0

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
