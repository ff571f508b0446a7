"""Following a record until it ends, through a Redis outage: what `Drover.wait`,
`wait_evacuation` and `events --follow` share (producer/api.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

from config.settings import Settings
from jobs.errors import redis_location
from jobs.follow import MS_PER_S, wait_for_end
from jobs.store import JobStore
from producer.outage import OutageRider

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
