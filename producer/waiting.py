"""Following a record until it ends, through a Redis outage: what `Drover.wait`,
`wait_evacuation` and `events --follow` share (producer/api.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol, TypeVar

from config.settings import Settings
from jobs.errors import broker_errors, redis_location, require_seconds
from jobs.follow import MS_PER_S, wait_for_end
from jobs.store import JobStore
from jobs.streams import skipped_notice
from producer.outage import OutageRider

R = TypeVar("R")
End = tuple[str, frozenset[str]]  # a record's state event, and its terminal states

# Whether the record has ended, and its state now.
Ended = Callable[[], tuple[bool, str]]


def rider(
    settings: Settings, notice: Callable[[str], None], job_id: str, timeout: float | None
) -> OutageRider:
    """Redis calls of one follower of `job_id`, riding out an outage (bounded by the
    follower's own `timeout` too)."""
    return OutageRider(
        redis_location(settings.redis_url),
        f"job {job_id}",
        settings.tunables.wait_redis_outage,
        notice,
        deadline=None if timeout is None else time.monotonic() + timeout,
        follow_again=f"drover events {job_id} --follow",
    )


def wait_for_state_event(
    store: JobStore,
    settings: Settings,
    job_id: str,
    ended: Ended,
    state_event: str,
    terminal_names: frozenset[str],
    timeout: float | None,
    ride: OutageRider,
) -> None:
    """Block until the record has ended and its terminal `state_event` is on its stream."""
    wait_for_end(
        store,
        job_id,
        lambda: ended()[0],
        end_event=lambda ev: _is_end(ev, state_event, terminal_names),
        state=lambda: ended()[1],
        block_ms=int(MS_PER_S * settings.tunables.wait_block),
        timeout=timeout,
        guard=ride,
    )


def _is_end(event: dict[str, object], state_event: str, terminal_names: frozenset[str]) -> bool:
    """The job's terminal state event; an entry whose `state` is not a string (written by
    hand: a list would not even hash) is not one."""
    state = event.get("state")
    return event.get("event") == state_event and isinstance(state, str) and state in terminal_names


def wait_record(
    store: JobStore,
    settings: Settings,
    notice: Callable[[str], None],
    rid: str,
    timeout: float | None,
    get: Callable[[str], R],
    end: End,
) -> R:
    """Until the record `rid` ends and `end` (its state event, terminal states) is on its
    stream; the record then (`get` reads it: a job's or an evacuation's). `timeout`:
    seconds, above 0 (BadArgument otherwise)."""
    require_seconds("timeout", timeout)
    ride = rider(settings, notice, rid, timeout)

    def ended() -> tuple[bool, str]:
        record: Any = ride(lambda: get(rid))
        return bool(record.terminal), str(record.state.value)

    wait_for_state_event(store, settings, rid, ended, *end, timeout, ride)
    return ride(lambda: get(rid))


def record_events(
    store: JobStore,
    settings: Settings,
    notice: Callable[[str], None],
    is_ended: Callable[[str, str], bool],
    job_id: str,
    follow: bool,
    timeout: float | None,
) -> Iterator[dict[str, Any]]:
    """The events of a job or evacuation (`is_ended(kind, id)` says whether it has ended);
    with `follow`, until it has. Each stream entry that is no event drover writes is passed
    over and said once, in one line, through `notice`."""
    ride = rider(settings, notice, job_id, timeout)
    said = skipped_notice(notice, job_id)
    # JobNotFound for a wrong id, before any waiting
    kind = ride(partial(store.kind, job_id)) if follow else store.kind(job_id)
    if follow:
        yield from store.follow_events(
            job_id, lambda: is_ended(kind, job_id), timeout=timeout, guard=ride, skipped=said
        )
    else:
        for _, event in store.read_events(job_id, skipped=said):
            yield event


class EventSource(Protocol):
    """What `events_of` needs of producer/api.py's Drover (which imports this module)."""

    settings: Settings
    store: JobStore

    def events(
        self, job_id: str, *, follow: bool = False, timeout: float | None = None
    ) -> Iterator[dict[str, Any]]: ...


def events_of(d: EventSource, job_id: str, follow: bool) -> Iterator[dict[str, Any]]:
    """`drover events [--follow]`: the record's events from `d` (producer/api.py's Drover,
    which imports this module), its kind read once first when following. Redis out of reach
    before the follower has seen the id is BrokerUnavailable at once (one line naming Redis),
    not an outage ridden out for `wait_redis_outage` with a notice that the job "goes on":
    nothing is known to go on, and the id may name nothing. An outage met once following is
    ridden out (record_events), as `migrate --wait` does for the job it has just queued.
    JobNotFound for a wrong id, as without --follow."""
    if follow:
        with broker_errors(d.settings.redis_url):
            d.store.kind(job_id)
    return d.events(job_id, follow=follow)
