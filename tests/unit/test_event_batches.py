"""A step's events written together (config/events.py `batched`): in one round trip at the
step's end, in the order they were logged, each job's stream as it would have had them one by
one: a stream that refuses costs its job those events (said on its stream later), an outage
holds them all in order. Against the real test Redis, and a sink that fails like a stopped one.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from config import events
from config.event_shape import EVENTS_RECLAIMED
from config.events import EVENTS_LOST, StreamPublisher, batched, get_logger
from jobs.keys import events_key
from jobs.store import JobStore
from tests.unit.test_redis_outage import FlakySink

GOOD, BAD = "a1a1a1a1a1a1", "b1b1b1b1b1b1"
MAX_ID = "18446744073709551615-18446744073709551615"


class CountingSink:
    """The test store, counting the round trips events take to it."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.single = self.batches = 0

    def append_event(self, job_id: str, event: dict[str, Any]) -> str:
        self.single += 1
        return self.store.append_event(job_id, event)

    def append_events(self, items: list[tuple[str, dict[str, Any]]]) -> list[Exception | None]:
        self.batches += 1
        return self.store.append_events(items)


@pytest.fixture
def chain(store: JobStore) -> Iterator[tuple[CountingSink, io.StringIO]]:
    """The process-wide chain as a worker sets it up, writing through a CountingSink."""
    old = structlog.get_config()
    sink, lines = CountingSink(store), io.StringIO()
    events.configure("kvm1", sink, stream=lines, flush_interval=3600)
    try:
        yield sink, lines
    finally:
        structlog.configure(**old)


def names(store: JobStore, job_id: str) -> list[Any]:
    return [ev.get("i", ev["event"]) for _, ev in store.read_events(job_id)]


def test_a_steps_events_reach_their_streams_at_its_end_in_order_in_one_round_trip(
    store: JobStore, chain: tuple[CountingSink, io.StringIO]
) -> None:
    sink, lines = chain
    log = get_logger()
    with batched():
        for i in range(8):
            log.info("precheck.passed", job_id=GOOD if i % 2 else BAD, check=f"c{i}", i=i)
        # Logged, not yet on the streams: the log lines are written at once.
        assert store.read_events(GOOD) == [] and store.read_events(BAD) == []
        assert [json.loads(line)["i"] for line in lines.getvalue().splitlines()] == list(range(8))
    assert (sink.batches, sink.single) == (1, 0)
    assert names(store, GOOD) == [1, 3, 5, 7] and names(store, BAD) == [0, 2, 4, 6]
    # Outside a step, one round trip an event, as before.
    log.info("phase.finished", job_id=GOOD, i=8)
    assert (sink.batches, sink.single) == (1, 1)
    assert names(store, GOOD)[-1] == 8


def test_events_without_a_job_and_an_empty_step_take_no_round_trip(
    chain: tuple[CountingSink, io.StringIO],
) -> None:
    sink, lines = chain
    with batched():
        get_logger().info("worker.ready")
    with batched():
        pass
    assert (sink.batches, sink.single) == (0, 0)
    assert json.loads(lines.getvalue())["event"] == "worker.ready"


def test_a_stream_run_out_of_ids_in_a_step_is_given_them_back_in_order(store: JobStore) -> None:
    store.r.xadd(events_key(BAD), {"data": "{}"}, id=MAX_ID)
    publisher = StreamPublisher(store.without_retry, "kvm1", flush_interval=3600)
    items = [(job, {"event": "precheck.passed", "i": i}) for i in range(3) for job in (GOOD, BAD)]
    publisher.send_many(items)
    assert names(store, GOOD) == [0, 1, 2]
    assert names(store, BAD) == [EVENTS_RECLAIMED, 0, 1, 2]
    assert not publisher.held and not publisher.lost


def test_a_refusing_stream_in_a_step_costs_its_job_alone_and_is_said_later(
    store: JobStore,
) -> None:
    store.r.hset(events_key(BAD), "x", "y")
    publisher = StreamPublisher(store.without_retry, "kvm1", flush_interval=3600)
    items = [(job, {"event": "precheck.passed", "i": i}) for i in range(3) for job in (GOOD, BAD)]
    publisher.send_many(items)
    assert names(store, GOOD) == [0, 1, 2]
    assert not publisher.held and publisher.lost == {BAD: 3}
    assert "its stream refused" in publisher.lost_why[BAD]

    store.r.delete(events_key(BAD))
    publisher.send_many([(BAD, {"event": "job.state", "i": 3}), (GOOD, {"event": "x", "i": 3})])
    (_, lost), (_, last) = store.read_events(BAD)
    assert (lost["event"], lost["count"], last["i"]) == (EVENTS_LOST, 3, 3)
    assert names(store, GOOD) == [0, 1, 2, 3] and not publisher.lost


class Flaky(FlakySink):
    """Fails like a stopped Redis until `up`; batches and single events alike."""

    def append_events(self, items: list[tuple[str, dict[str, Any]]]) -> list[Exception | None]:
        for item in items:  # down: refused at the first, nothing written
            self.append_event(*item)
        return [None] * len(items)


def test_a_step_ending_in_an_outage_is_held_in_order_behind_what_is_held() -> None:
    sink = Flaky()
    publisher = StreamPublisher(sink, "kvm1", flush_interval=3600)
    assert not publisher.publish(GOOD, {"event": "phase.started", "i": 0})
    publisher.send_many([(GOOD, {"event": "precheck.passed", "i": i}) for i in (1, 2, 3)])
    assert [e["i"] for _, e in publisher.held] == [0, 1, 2, 3]
    sink.up = True
    # Still holding: a step's events wait behind the held ones, not jump them.
    publisher.send_many([(GOOD, {"event": "precheck.passed", "i": 4})])
    assert [e["i"] for _, e in publisher.held] == [0, 1, 2, 3, 4] and not sink.written
    assert publisher.flush()
    assert [e["i"] for _, e in sink.written] == [0, 1, 2, 3, 4]
