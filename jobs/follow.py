"""Following a job's (or an evacuation's) events until it has ended: the one loop behind
`Drover.wait`, `drover events --follow` and the benchmarks.

The stream is read once, in order, from the first event: old events at once, then new ones
with a blocking read that returns the moment one lands (no polling tick). The record is the
truth of whether the job has ended; the stream carries the end event a follower waits for.
The follow ends once both say so, or once the record has said so for a grace period without
the end event (a worker that could not write its last event; the record rules then). A last
non-blocking read passes on whatever landed just after.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial

from jobs.connection import Guard, direct
from jobs.states import EVACUATION_TERMINAL, TERMINAL
from jobs.streams import Event, EventStreams, Skipped

DEFAULT_BLOCK_MS = 1000
# How long a follower waits for the end event once the record has ended.
TERMINAL_EVENT_GRACE_S = 5.0
MS_PER_S = 1000

_END_EVENTS = {
    "job.state": frozenset(s.value for s in TERMINAL),
    "evacuation.state": frozenset(s.value for s in EVACUATION_TERMINAL),
}


def is_end_event(event: Event) -> bool:
    """The event a job's (or an evacuation's) worker writes when it reaches a terminal state."""
    names = _END_EVENTS.get(str(event.get("event")))
    state = event.get("state")
    return names is not None and isinstance(state, str) and state in names


def follow(
    streams: EventStreams,
    job_id: str,
    ended: Callable[[], bool],
    *,
    end_event: Callable[[Event], bool] = is_end_event,
    state: Callable[[], str] | None = None,
    block_ms: int = DEFAULT_BLOCK_MS,
    timeout: float | None = None,
    guard: Guard = direct,
    grace_s: float = TERMINAL_EVENT_GRACE_S,
    skipped: Skipped | None = None,
) -> Iterator[tuple[str, Event]]:
    """(stream id, event) of every event of the job, old then new, until it has ended.

    `ended` reads the record; it is asked only when the stream is quiet or the end event has
    been read, so a busy stream costs no record reads. With `timeout`, TimeoutError once that
    many seconds have passed without an end (`state` phrases it). Every Redis call goes
    through `guard` (a follower riding out an outage, say); the stream is read on from the
    last entry read, so nothing is skipped or repeated. An entry that is no event is passed
    over, told to `skipped` once (jobs/streams.py).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    grace_until: float | None = None
    last, seen_end = "0-0", False
    read = partial(streams.read_batch, job_id, skipped=skipped)
    batch = guard(read)
    while True:
        for eid, event in batch.events:
            seen_end = seen_end or end_event(event)
            yield eid, event
        last = batch.last or last
        now = time.monotonic()
        late = deadline is not None and now > deadline
        if (seen_end or batch.last is None or late) and guard(ended):
            grace_until = grace_until or now + grace_s
            if seen_end or now > grace_until:
                yield from guard(partial(read, after=last)).events
                return
        elif late:
            still = f"still {guard(state)}" if state is not None else "has not ended"
            raise TimeoutError(f"job {job_id} {still} after {timeout:g}s")
        wait_s = block_ms / MS_PER_S
        for until in (deadline, grace_until):
            if until is not None:
                wait_s = min(wait_s, max(until - now, 0.0))
        batch = guard(partial(read, after=last, block_ms=_ms(wait_s)))


def wait_for_end(
    streams: EventStreams,
    job_id: str,
    ended: Callable[[], bool],
    *,
    end_event: Callable[[Event], bool] = is_end_event,
    state: Callable[[], str] | None = None,
    block_ms: int = DEFAULT_BLOCK_MS,
    timeout: float | None = None,
    guard: Guard = direct,
    grace_s: float = TERMINAL_EVENT_GRACE_S,
    skipped: Skipped | None = None,
) -> Event | None:
    """Block until the job has ended and its end event is in the stream; that event (None
    when the worker could not write it within `grace_s` of the record's end)."""
    found: Event | None = None
    for _, event in follow(
        streams,
        job_id,
        ended,
        end_event=end_event,
        state=state,
        block_ms=block_ms,
        timeout=timeout,
        guard=guard,
        grace_s=grace_s,
        skipped=skipped,
    ):
        if found is None and end_event(event):
            found = event
    return found


def _ms(seconds: float) -> int:
    """A blocking read's time: at least 1 ms (0 would block for ever)."""
    return max(1, int(seconds * MS_PER_S))
