"""A terminal transition against keys written by hand to another type than drover writes
(anyone with the Redis password: `SET drover:host:kvm2:reservations x`): Redis does not undo
a script's writes when a command in it fails, and the state is written first, so each key
the end touches after it is skipped when it is of another type, and the rest of the end is
done: the job ends, its slots, active mark, place in line and bookings elsewhere go, and the
caller is told of no error. Against the real test Redis."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from jobs.admission import Admission, inbound_gate, outbound_gate
from jobs.keys import (
    ACTIVE_JOBS,
    BLOCKING_GATES,
    LANES,
    LANES_BLOCKED_BY,
    LANES_READY,
    WAITING,
    blocked_key,
    job_key,
    lane_key,
    transitions_key,
)
from jobs.states import JobState
from jobs.store import JobStore, reservations_key
from tests.conftest import RedisServer
from tests.unit.test_admission import settings, submit

HOSTILE = "x"  # what each guarded key is SET to
BLOCKED_LANE = lane_key("kvm3", "kvm2")  # the waiting job's, refused by kvm2's inbound limit
GUARDED = {
    "reservations of the destination": reservations_key("kvm2"),
    "reservations of the source": reservations_key("kvm1"),
    "the active set": ACTIVE_JOBS,
    "the waiting line": WAITING,
    "the waiting job's lane": BLOCKED_LANE,
    "every lane": LANES,
    "ready lanes": LANES_READY,
    "lane -> blocking gate": LANES_BLOCKED_BY,
    "gate -> limit": BLOCKING_GATES,
    "lanes blocked by the gate": blocked_key(inbound_gate("kvm2")),
    "a gate the job holds a slot in": outbound_gate("kvm1"),
    "the job's history": "history",  # the running job's and the waiting one's
}


def started_and_waiting(store: JobStore, redis_srv: RedisServer, tmp_path: Path) -> list[str]:
    """One job admitted kvm1 -> kvm2 (its slots taken, memory booked on both hosts) and one
    kvm3 -> kvm2 waiting in its lane behind kvm2's inbound limit of 1."""
    running = submit(store, "web01", "kvm1", "kvm2", reserve_mib=64)
    store.r.hset(reservations_key("kvm1"), running, "64")
    waiting = submit(store, "web02", "kvm3", "kvm2")
    assert Admission(store).safety_pass(settings(tmp_path, redis_srv), lambda j, s: None) == [
        running
    ]
    assert store.r.zscore(blocked_key(inbound_gate("kvm2")), BLOCKED_LANE) is not None
    assert store.r.sismember(outbound_gate("kvm1"), running)
    return [running, waiting]


def spoiled(store: JobStore, key: str, jobs: list[str]) -> list[str]:
    keys = [transitions_key(job) for job in jobs] if key == "history" else [key]
    for each in keys:
        store.r.delete(each)
        store.r.set(each, HOSTILE)
    return keys


def left_behind(store: JobStore, jobs: list[str], spoilt: list[str]) -> list[str]:
    """What the two ends should have taken and did not (the spoilt keys aside)."""
    r, running, waiting = store.r, jobs[0], jobs[1]
    held: dict[str, Callable[[], object]] = {
        ACTIVE_JOBS: lambda: r.smismember(ACTIVE_JOBS, jobs) != [0, 0],
        WAITING: lambda: r.zscore(WAITING, waiting) is not None,
        BLOCKED_LANE: lambda: r.exists(BLOCKED_LANE) == 1,
        LANES: lambda: r.sismember(LANES, BLOCKED_LANE) == 1,
        LANES_READY: lambda: r.zscore(LANES_READY, BLOCKED_LANE) is not None,
        LANES_BLOCKED_BY: lambda: r.hexists(LANES_BLOCKED_BY, BLOCKED_LANE) == 1,
        BLOCKING_GATES: lambda: r.hexists(BLOCKING_GATES, inbound_gate("kvm2")) == 1,
        blocked_key(inbound_gate("kvm2")): lambda: r.exists(blocked_key(inbound_gate("kvm2"))),
        outbound_gate("kvm1"): lambda: r.sismember(outbound_gate("kvm1"), running) == 1,
        inbound_gate("kvm2"): lambda: r.sismember(inbound_gate("kvm2"), running) == 1,
        reservations_key("kvm1"): lambda: r.hexists(reservations_key("kvm1"), running) == 1,
        reservations_key("kvm2"): lambda: r.hexists(reservations_key("kvm2"), running) == 1,
    }
    if LANES_BLOCKED_BY in spoilt:  # which gate blocked the lane cannot be known
        spoilt = [*spoilt, BLOCKING_GATES, blocked_key(inbound_gate("kvm2"))]
    return [key for key, still in held.items() if key not in spoilt and still()]


@pytest.mark.parametrize("what", list(GUARDED))
def test_a_job_ends_wholly_whatever_key_is_of_another_type(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path, what: str
) -> None:
    jobs = started_and_waiting(store, redis_srv, tmp_path)
    spoilt = spoiled(store, GUARDED[what], jobs)

    for job, end in zip(jobs, (JobState.FAILED, JobState.CANCELLED), strict=True):
        moved, previous = store.transition(job, end, host="test", reason="x")  # WRONGTYPE before
        assert moved and previous is not None
        assert store.r.hget(job_key(job), "state") == end.value

    assert left_behind(store, jobs, spoilt) == []
    assert all(store.r.get(key) == HOSTILE for key in spoilt)  # left as found
    if what != "the job's history":
        assert [t.state for t in store.get(jobs[0]).transitions[-1:]] == [JobState.FAILED]
