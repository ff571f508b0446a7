"""One event writer: a worker's events and a producer's land in a job's stream in one shape.

A follower reads one stream written by several processes (the producer's `job.queued`, the
workers' phase events, an admission pass's `job.waiting`); `drover events` and the benchmarks
compare its timestamps. Written through a real Redis and read back as followers read it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import structlog

from config import events
from config.events import CONTRACT_KEYS, get_logger, job_event
from jobs.store import JobStore

JOB_ID = "j-writer-1"
# Both events are written within this of each other, by the clock of this one process.
SAME_MOMENT = timedelta(seconds=30)


@pytest.fixture
def worker_log(store: JobStore) -> Iterator[io.StringIO]:
    """The process-wide chain as a worker sets it up, writing to `store`; restored after."""
    old = structlog.get_config()
    log = io.StringIO()
    events.configure("kvm1", store.without_retry, stream=log)
    try:
        yield log
    finally:
        structlog.configure(**old)


def test_worker_and_producer_events_share_one_shape_and_one_timestamp_format(
    store: JobStore, worker_log: io.StringIO
) -> None:
    store.append_event(JOB_ID, job_event("job.queued", "producer@here", job_id=JOB_ID))
    get_logger().info("phase.started", job_id=JOB_ID, phase="preflight", domain="vm1")

    (_, queued), (_, started) = store.read_events(JOB_ID)
    assert (queued["event"], started["event"]) == ("job.queued", "phase.started")
    assert set(CONTRACT_KEYS) <= set(queued) and set(CONTRACT_KEYS) <= set(started)
    assert (queued["host"], started["host"]) == ("producer@here", "kvm1")
    stamps = [datetime.fromisoformat(e["ts"]) for e in (queued, started)]
    assert all(ts.tzinfo is not None and ts.utcoffset() == timedelta(0) for ts in stamps)
    # One format, the one `datetime.isoformat()` writes: `drover events` sorts and diffs them.
    assert [e["ts"] for e in (queued, started)] == [ts.isoformat() for ts in stamps]
    assert timedelta(0) <= stamps[1] - stamps[0] < SAME_MOMENT
    assert stamps[0] <= datetime.now(UTC)


def test_the_worker_log_line_is_the_stream_event_plus_its_level(
    store: JobStore, worker_log: io.StringIO
) -> None:
    get_logger().info("prepare.ready", job_id=JOB_ID, phase="prepare", memory_mib=512)
    get_logger().info("worker.ready")  # no job: a log line only

    (_, on_stream), *rest = store.read_events(JOB_ID)
    assert rest == []
    lines = [json.loads(line) for line in worker_log.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["prepare.ready", "worker.ready"]
    assert lines[0] == {**on_stream, "level": "info"}
    assert "level" not in on_stream and "stream_held" not in lines[0]
    assert lines[1]["job_id"] is None and lines[1]["host"] == "kvm1"
