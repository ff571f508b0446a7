"""Redis outages on a real redis-server of the test's own, stopped and started again.

The store rides out a stopped server for `retry_for` (a refused connect included) and no
longer; a worker's events are held through the outage and written in order when it ends; a
migration's monitor keeps watching libvirt whatever the abort check says; a phase that loses
Redis for longer than that stops without a verdict; a follower of a job waits the outage out
and says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import libvirt
import pytest
import redis

from config.events import EVENTS_LOST, StreamPublisher, job_event
from config.settings import load_settings
from jobs.model import Job
from jobs.phases import Phase
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore, job_key
from lab.proc import alive
from producer.api import Drover
from producer.outage import RedisOutage
from tests.conftest import RedisServer
from tests.support.lab_fixtures import wait_for
from tests.support.registry import REGISTRY
from worker.ledger import Ledger, PhaseMark
from worker.libvirt_host import LibvirtHost
from worker.monitor import MigrationMonitor, Progress
from worker.phase_errors import PhaseFailed
from worker.phase_frame import run_in_frame
from worker.runtime import Runtime

# Longer than any outage below: a call that rides one out returns well within it.
RIDE_OUT_S = 20.0
# A call that must not wait (no retry, or an error that is no outage) fails within this.
AT_ONCE_S = 1.0
# How long a call is seen still waiting (not failed) while the server is down.
STILL_WAITING_S = 1.0
SPEC = MigrationSpec(domain="web01", src="kvm1", dst="kvm2")


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server only this test stops and starts (the session's stays up)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    if alive(server.pid):
        server.stop()


def stop(server: RedisServer) -> None:
    server.stop()  # SIGTERM: the AOF is flushed, the port closed
    wait_for(lambda: not alive(server.pid), 10, "redis-server to stop")


class Call:
    """A store call on its own thread, so the test can restart Redis while it waits."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.started = time.monotonic()
        self.ended = 0.0
        threading.Thread(target=self._run, args=(fn,), daemon=True).start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended = time.monotonic()
            self.done.set()

    @property
    def took(self) -> float:
        return self.ended - self.started


@pytest.mark.parametrize("pooled", [False, True], ids=["fresh-store", "pooled-connection"])
def test_a_store_call_rides_out_a_stopped_redis(srv: RedisServer, pooled: bool) -> None:
    job_id = JobStore.from_url(srv.url).create(SPEC, host="test")
    store = JobStore.from_url(srv.url, retry_for=RIDE_OUT_S)
    if pooled:  # a connection in the pool that the stop will break
        assert store.state(job_id) is JobState.QUEUED
    stop(srv)
    call = Call(lambda: store.state(job_id))
    assert not call.done.wait(STILL_WAITING_S), f"the call gave up at once: {call.error!r}"
    srv.start()
    assert call.done.wait(RIDE_OUT_S), "the call did not return once Redis was back"
    assert call.error is None, repr(call.error)
    assert call.result is JobState.QUEUED


def test_without_retry_a_stopped_redis_fails_at_once(srv: RedisServer) -> None:
    riding = JobStore.from_url(srv.url, retry_for=RIDE_OUT_S)
    stop(srv)
    for store in (JobStore.from_url(srv.url, retry_for=0), riding.without_retry):
        call = Call(partial(store.state, "x"))
        assert call.done.wait(AT_ONCE_S)
        assert isinstance(call.error, redis.ConnectionError), repr(call.error)


def test_an_outage_longer_than_retry_for_fails_clearly(srv: RedisServer) -> None:
    retry_for = 1.5
    store = JobStore.from_url(srv.url, retry_for=retry_for)
    assert store.r.ping()
    stop(srv)
    call = Call(lambda: store.r.get("x"))
    assert call.done.wait(RIDE_OUT_S)
    assert isinstance(call.error, redis.ConnectionError), repr(call.error)
    assert "Connection refused" in str(call.error)
    # The pooled connection's reconnect spends the command's budget: one budget, not two.
    assert retry_for <= call.took < 2 * retry_for


def test_a_wrong_password_is_not_an_outage(redis_srv: RedisServer) -> None:
    url = f"redis://:wrong@127.0.0.1:{redis_srv.port}/0"
    call = Call(lambda: JobStore.from_url(url, retry_for=RIDE_OUT_S).r.ping())
    assert call.done.wait(AT_ONCE_S)
    assert isinstance(call.error, redis.AuthenticationError), repr(call.error)


def stream(store: JobStore, job_id: str) -> list[Any]:
    return [ev.get("i", ev["event"]) for _, ev in store.read_events(job_id)]


def test_events_of_an_outage_are_written_in_order_when_redis_returns(srv: RedisServer) -> None:
    store = JobStore.from_url(srv.url, retry_for=RIDE_OUT_S, probe_timeout=AT_ONCE_S)
    publisher = StreamPublisher(store.without_retry, "kvm1", flush_interval=0.05)
    assert publisher.publish("j1", {"event": "before", "i": 0})
    stop(srv)
    started = time.monotonic()
    held = [publisher.publish("j1", {"event": "during", "i": i}) for i in range(1, 6)]
    assert held == [False] * 5
    assert time.monotonic() - started < AT_ONCE_S, "publishing waited for Redis"
    srv.start()
    publisher.publish("j1", {"event": "after", "i": 6})
    wait_for(lambda: len(stream(store, "j1")) == 7, RIDE_OUT_S, "the held events")
    assert stream(store, "j1") == list(range(7))
    assert publisher.publish("j1", {"event": "later", "i": 7}), "still holding after the flush"


class FlakySink:
    """Fails like a stopped Redis until `up`."""

    def __init__(self) -> None:
        self.up = False
        self.written: list[tuple[str, dict[str, Any]]] = []

    def append_event(self, job_id: str, event: dict[str, Any]) -> str:
        if not self.up:
            raise redis.ConnectionError("Error 111 connecting. Connection refused.")
        self.written.append((job_id, event))
        return str(len(self.written))


def test_a_full_hold_drops_the_oldest_and_the_stream_says_how_many() -> None:
    sink = FlakySink()
    limit = 100
    publisher = StreamPublisher(sink, "kvm1", limit=limit, flush_interval=60)
    for i in range(limit + 3):
        publisher.publish("j1", {"event": "migration.progress", "i": i})
    sink.up = True
    assert not publisher.publish("j1", {"event": "job.state", "i": limit + 3}), "jumped the queue"
    assert publisher.flush()
    first_job, first = sink.written[0]
    assert (first_job, first["event"], first["count"]) == ("j1", EVENTS_LOST, 4)
    assert [e["i"] for _, e in sink.written[1:]] == list(range(4, limit + 4))


class FakeDomain:
    """A domain in the middle of a migration, as jobStats shows it."""

    def jobStats(self) -> dict[str, Any]:
        return {"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED, "data_total": 100, "data_remaining": 50}

    def state(self) -> tuple[int, int]:
        return libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED


def test_the_monitor_keeps_watching_while_the_abort_check_fails() -> None:
    """Redis away: no abort request can be read, and progress and policy go on regardless."""
    reports: list[Progress] = []
    actions: list[str] = []
    finished = threading.Event()
    redis_up = threading.Event()
    wanted = 6

    def abort_requested() -> str | None:
        if not redis_up.is_set():
            raise redis.ConnectionError("Error 111 connecting. Connection refused.")
        return "operator abort"

    def on_progress(p: Progress) -> None:
        reports.append(p)
        if len(reports) == wanted // 2:
            redis_up.set()  # Redis is back: the next tick reads the abort request
        if len(reports) >= wanted:
            finished.set()

    monitor = MigrationMonitor(
        FakeDomain(),  # type: ignore[arg-type]
        interval=0.05,
        engine=None,
        on_progress=on_progress,
        on_action=lambda a: actions.append(a.kind),
        abort_requested=abort_requested,
    )
    monitor.run(finished)
    assert len(reports) >= wanted and all(p.stage == "transfer" for p in reports)
    assert actions == ["cancel"] and monitor.cancelled


def drover_on(srv: RedisServer, tmp_path: Path, extra: str = "") -> tuple[Drover, list[str]]:
    path = tmp_path / "drover.toml"
    path.write_text(REGISTRY.format(url=srv.url) + extra)
    notices: list[str] = []
    return Drover(load_settings(path), notice=notices.append), notices


def end_job(store: JobStore, job_id: str) -> None:
    store.r.hset(job_key(job_id), "state", JobState.SUCCEEDED.value)
    store.append_event(job_id, job_event("job.state", "kvm1", job_id=job_id, state="succeeded"))


def test_wait_follows_a_job_through_an_outage(srv: RedisServer, tmp_path: Path) -> None:
    d, notices = drover_on(srv, tmp_path)
    job_id = d.store.create(SPEC, host="test")
    waiting = Call(lambda: d.wait(job_id, timeout=RIDE_OUT_S * 2))
    following = Call(lambda: [e["event"] for e in d.events(job_id, follow=True)])
    stop(srv)
    wait_for(lambda: len(notices) >= 2, RIDE_OUT_S, "a notice from each follower")
    assert not waiting.done.is_set() and not following.done.is_set()
    srv.start()
    end_job(JobStore.from_url(srv.url), job_id)
    assert waiting.done.wait(RIDE_OUT_S) and following.done.wait(RIDE_OUT_S)
    assert waiting.error is None and following.error is None, (waiting.error, following.error)
    assert waiting.result.state is JobState.SUCCEEDED
    assert following.result == ["job.state"]
    assert any("unreachable" in n and "still following" in n for n in notices), notices
    assert any("is back" in n for n in notices), notices
    assert all("\n" not in n and srv.password not in n for n in notices)


def test_wait_gives_up_after_wait_redis_outage_and_says_the_job_goes_on(
    srv: RedisServer, tmp_path: Path
) -> None:
    d, _ = drover_on(srv, tmp_path, "\n[tunables]\nwait_redis_outage = 1\n")
    job_id = d.store.create(SPEC, host="test")
    stop(srv)
    waiting = Call(lambda: d.wait(job_id))
    assert waiting.done.wait(RIDE_OUT_S)
    assert isinstance(waiting.error, RedisOutage), repr(waiting.error)
    assert f"job {job_id} goes on" in str(waiting.error)
    assert srv.password not in str(waiting.error)


def test_a_phase_that_loses_redis_for_good_stops_without_a_verdict(
    config: Path, store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Longer than redis_retry_for: no `failed` (the migration may have completed), no end
    recorded; recovery takes the phase up from libvirt's state once Redis is back."""
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    job_id = store.create(SPEC, host="test")
    rt = Runtime("kvm1", store, LibvirtHost("test:///default"), Ledger(str(tmp_path / "ledger")))

    def perform(_rt: Runtime, _job: Job) -> JobState | None:
        raise redis.ConnectionError("Error 111 connecting to redis:6379. Connection refused.")

    with pytest.raises(redis.ConnectionError):
        run_in_frame(rt, store.get(job_id), Phase.PERFORM, perform, False, 0)
    job = store.get(job_id)
    assert job.state is JobState.QUEUED and job.reason is None
    record = job.phases[Phase.PERFORM.value]
    assert record.ended is None and record.error is None
    # Interrupted: started here, not ended, in the host's own ledger too (recovery takes it).
    assert rt.ledger.marked(job_id, Phase.PERFORM.value, PhaseMark.STARTED)
    assert not rt.ledger.marked(job_id, Phase.PERFORM.value, PhaseMark.ENDED)


def test_the_frame_marks_in_the_hosts_ledger_each_phase_it_starts_and_ends(
    config: Path, store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery believes the host's ledger, not the record, about what ran here: a phase
    ended (passed or failed) is marked so, and is never settled again."""
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    rt = Runtime("kvm1", store, LibvirtHost("test:///default"), Ledger(str(tmp_path / "ledger")))
    passed, failed = store.create(SPEC, host="test"), store.create(SPEC, host="test")

    def refuse(_rt: Runtime, _job: Job) -> JobState | None:
        raise PhaseFailed("refused")

    run_in_frame(rt, store.get(passed), Phase.SOURCE_PREFLIGHT, lambda r, j: None, False, 0)
    with pytest.raises(PhaseFailed):
        run_in_frame(rt, store.get(failed), Phase.SOURCE_PREFLIGHT, refuse, False, 0)
    for job_id in (passed, failed):
        for mark in (PhaseMark.STARTED, PhaseMark.ENDED):
            assert rt.ledger.marked(job_id, Phase.SOURCE_PREFLIGHT.value, mark), (job_id, mark)
    assert not rt.ledger.marked(passed, Phase.PERFORM.value, PhaseMark.STARTED)
