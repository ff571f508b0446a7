"""One job's event stream that refuses writes (anyone with the Redis password can make it so)
costs that job its events, said once on its stream when it takes writes again; it never holds
or delays another job's events, as a Redis outage does. Against the real test Redis."""

from __future__ import annotations

import io
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import structlog

from config import events
from config.event_shape import EVENTS_RECLAIMED
from config.events import EVENTS_LOST, StreamPublisher, get_logger
from jobs.keys import events_key
from jobs.store import JobStore
from tests.conftest import RedisServer

GOOD, BAD = "a0a0a0a0a0a0", "b0b0b0b0b0b0"
MAX_ID = "18446744073709551615-18446744073709551615"
# Writing an event to a stream that takes it, or refusing one, takes well under this.
AT_ONCE_S = 1.0


def top_id_at_the_maximum(r: redis.Redis) -> None:
    """No later XADD with `*` can go past this entry."""
    r.xadd(events_key(BAD), {"data": "{}"}, id=MAX_ID)


def of_another_type(r: redis.Redis) -> None:
    r.hset(events_key(BAD), "x", "y")


# Streams that refuse every write for good. A stream whose top ID was written at the largest
# one is given its IDs back instead (the tests at the end).
POISONS = {"wrongtype": of_another_type}
Poison = Callable[[redis.Redis], None]


def names(store: JobStore, job_id: str) -> list[Any]:
    return [ev.get("i", ev["event"]) for _, ev in store.read_events(job_id)]


@pytest.fixture
def publisher(store: JobStore) -> StreamPublisher:
    # A flush interval no test waits for: anything held would stay held.
    return StreamPublisher(store.without_retry, "kvm1", flush_interval=3600)


@pytest.mark.parametrize("poison", POISONS.values(), ids=list(POISONS))
def test_another_jobs_events_are_written_at_once_and_the_poisoned_job_counts_its_loss(
    store: JobStore, publisher: StreamPublisher, poison: Poison
) -> None:
    poison(store.r)
    started = time.monotonic()
    assert publisher.publish(GOOD, {"event": "phase.started", "i": 0})
    assert not publisher.publish(BAD, {"event": "phase.started", "i": 0})
    assert not publisher.publish(BAD, {"event": "phase.done", "i": 1})
    # Nothing is held: the next event of the other job goes straight to its stream.
    assert publisher.publish(GOOD, {"event": "phase.done", "i": 1})
    assert time.monotonic() - started < AT_ONCE_S
    assert names(store, GOOD) == [0, 1]
    assert not publisher.held and publisher._flusher is None
    assert publisher.lost[BAD] == 2 and GOOD not in publisher.lost
    assert "its stream refused" in publisher.lost_why[BAD]

    # Once the stream takes writes again, its next event comes after the count of those lost.
    store.r.delete(events_key(BAD))
    assert publisher.publish(BAD, {"event": "job.state", "i": 2})
    (_, lost), (_, last) = store.read_events(BAD)
    assert (lost["event"], lost["count"], lost["job_id"], last["i"]) == (EVENTS_LOST, 2, BAD, 2)
    assert lost["reason"].startswith("its stream refused: ")
    assert "\n" not in lost["reason"] and "data" not in lost["reason"]
    assert not publisher.lost


def test_a_stream_the_user_may_not_write_is_that_jobs_loss_alone(
    store: JobStore, redis_srv: RedisServer
) -> None:
    """NOPERM on one job's keys (an ACL written so): refused when queued in the MULTI."""
    user, password = f"events-{secrets.token_hex(4)}", secrets.token_hex(16)
    rules = ["reset", "on", f">{password}", f"~drover:job:{GOOD}*", "+@all"]
    store.r.execute_command("ACL", "SETUSER", user, *rules)  # type: ignore[no-untyped-call]
    try:
        url = f"redis://{user}:{password}@127.0.0.1:{redis_srv.port}/0"
        limited = JobStore.from_url(url)
        publisher = StreamPublisher(limited, "kvm1", flush_interval=3600)
        assert not publisher.publish(BAD, {"event": "phase.started", "i": 0})
        assert publisher.publish(GOOD, {"event": "phase.started", "i": 0})
        assert not publisher.held and publisher.lost == {BAD: 1}
        assert names(store, GOOD) == [0]
    finally:
        store.r.acl_deluser(user)


class OutageThenRefusal:
    """A sink failing like a stopped Redis until `up`, then writing to the real store."""

    def __init__(self, store: JobStore) -> None:
        self.store, self.up = store, False

    def append_event(self, job_id: str, event: dict[str, Any]) -> str:
        if not self.up:
            raise redis.ConnectionError("Error 111 connecting. Connection refused.")
        return self.store.without_retry.append_event(job_id, event)


def test_an_outage_holds_every_jobs_events_and_the_flush_passes_over_a_refusing_stream(
    store: JobStore,
) -> None:
    sink = OutageThenRefusal(store)
    publisher = StreamPublisher(sink, "kvm1", flush_interval=3600)
    for i in range(3):
        for job_id in (GOOD, BAD):
            assert not publisher.publish(job_id, {"event": "migration.progress", "i": i})
    assert len(publisher.held) == 6
    of_another_type(store.r)
    sink.up = True
    assert not publisher.publish(GOOD, {"event": "job.state", "i": 3}), "jumped the queue"
    assert publisher.flush()
    assert names(store, GOOD) == [0, 1, 2, 3]
    assert not publisher.held and publisher.lost == {BAD: 3}
    assert publisher.publish(GOOD, {"event": "late", "i": 4}), "still holding after the flush"


@pytest.fixture
def worker_log(store: JobStore) -> Iterator[io.StringIO]:
    """The process-wide chain as a worker sets it up, writing to `store`; restored after."""
    old = structlog.get_config()
    log = io.StringIO()
    events.configure("kvm1", store.without_retry, stream=log, flush_interval=3600)
    try:
        yield log
    finally:
        structlog.configure(**old)


@pytest.mark.parametrize("poison", POISONS.values(), ids=list(POISONS))
def test_the_worker_log_says_which_events_a_stream_refused_and_holds_none(
    store: JobStore, worker_log: io.StringIO, poison: Poison
) -> None:
    poison(store.r)
    log = get_logger()
    log.info("phase.started", job_id=BAD, phase="perform")
    log.info("phase.started", job_id=GOOD, phase="perform")
    log.info("phase.done", job_id=GOOD, phase="perform")

    lines = [json.loads(line) for line in worker_log.getvalue().splitlines()]
    assert [(line["job_id"], line["event"]) for line in lines] == [
        (BAD, "phase.started"),
        (GOOD, "phase.started"),
        (GOOD, "phase.done"),
    ]
    assert lines[0]["stream_lost"] and not any("stream_held" in line for line in lines)
    assert not any("stream_lost" in line for line in lines[1:])
    assert [ev["event"] for _, ev in store.read_events(GOOD)] == ["phase.started", "phase.done"]


class RefusingEveryWrite:
    """A Redis that refuses every write for now (a replica after a failover, memory full, a
    disk it cannot save to): an outage, whatever the stream."""

    def __init__(self, error: redis.RedisError) -> None:
        self.error = error

    def append_event(self, job_id: str, event: dict[str, Any]) -> str:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        redis.ResponseError("Command # 1 (XADD x) of pipeline caused error: MISCONF no disk"),
        redis.TimeoutError("Timeout reading from socket"),
    ],
    ids=["readonly", "oom", "misconf", "timeout"],
)
def test_a_refusal_of_every_write_is_held_as_an_outage(error: redis.RedisError) -> None:
    publisher = StreamPublisher(RefusingEveryWrite(error), "kvm1", flush_interval=3600)
    assert not publisher.publish(GOOD, {"event": "phase.started"})
    assert not publisher.publish(BAD, {"event": "phase.started"})
    assert len(publisher.held) == 2 and not publisher.lost


def test_a_stream_run_out_of_ids_by_hand_gets_them_back_and_the_jobs_story_goes_on(
    store: JobStore, publisher: StreamPublisher
) -> None:
    """An entry added at the largest ID (with another far ahead of the clock) left no ID for
    the next XADD: every later event of the job was refused and lost. Those entries are
    removed, the stream says so, and the job's events go on after its own earlier ones."""
    assert publisher.publish(BAD, {"event": "phase.started", "i": 0})
    store.r.xadd(events_key(BAD), {"data": "{}"}, id="99999999999999-0")
    top_id_at_the_maximum(store.r)
    assert publisher.publish(BAD, {"event": "phase.done", "i": 1})
    assert publisher.publish(GOOD, {"event": "phase.done", "i": 1})
    assert publisher.publish(BAD, {"event": "job.state", "i": 2})
    events = [ev for _, ev in store.read_events(BAD)]
    assert [ev.get("i", ev["event"]) for ev in events] == [0, EVENTS_RECLAIMED, 1, 2]
    note = events[1]
    assert (note["count"], note["job_id"], note["host"]) == (2, BAD, "kvm1")
    assert "ahead of the clock" in note["reason"] and "\n" not in note["reason"]
    ids = [entry for entry, _ in store.read_events(BAD)]
    assert all(int(entry.split("-")[0]) < 99999999999999 for entry in ids)
    assert not publisher.lost and not publisher.held
    assert names(store, GOOD) == [1]


def test_only_entries_a_day_ahead_of_redis_clock_are_taken_for_hand_written(
    store: JobStore,
) -> None:
    """An entry a minute ahead (a clock set back since it was written) is the job's own: kept.
    Only the entries no clock would have given are removed."""
    seconds, _ = store.r.time()
    soon = f"{(seconds + 60) * 1000}-0"
    store.r.xadd(events_key(BAD), {"data": "{}"}, id=soon)
    top_id_at_the_maximum(store.r)
    assert store.reclaim_ids(BAD) == 1
    assert [entry for entry, _ in store.r.xrange(events_key(BAD))] == [soon]
    store.r.xadd(events_key(BAD), {"data": "{}"})  # IDs to give again
    assert store.r.xlen(events_key(BAD)) == 2


def test_reclaiming_a_stream_with_nothing_ahead_removes_nothing(store: JobStore) -> None:
    store.r.xadd(events_key(GOOD), {"data": "{}"})
    assert store.reclaim_ids(GOOD) == 0
    assert store.r.xlen(events_key(GOOD)) == 1


def test_a_reader_past_an_entry_at_the_largest_id_reads_nothing_more_without_error(
    store: JobStore, publisher: StreamPublisher
) -> None:
    """A follower that had read the entry written at the largest ID asked Redis for the range
    after it, which Redis refuses: `drover migrate --wait` ended in a traceback."""
    assert publisher.publish(BAD, {"event": "phase.started", "i": 0})
    top_id_at_the_maximum(store.r)
    batch = store.read_batch(BAD)
    assert batch.last == MAX_ID
    assert store.read_batch(BAD, after=MAX_ID) == ([], None)
    assert store.read_batch(BAD, after=MAX_ID, block_ms=50) == ([], None)  # waits, then none
