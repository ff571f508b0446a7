"""A lease, claim or lock written by hand with a very long time to live (a `PX` of a year,
by anyone with the Redis password): drover never gives one of these longer than its own
bound (jobs/lease.py LONGEST_HOLD_S), so such a value holds nothing, and the exporter, the
admission safety pass and `drover beat` take over from it at once, saying so once."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from structlog.testing import capture_logs

from jobs.keys import EXPORTER_LEASE, SAFETY_PASS, SCHEDULE_LOCK
from jobs.lanes import Lanes
from jobs.lease import HAND_WRITTEN_MARGIN_S, LONGEST_HOLD_S, SCHEDULE_LOCK_TTL_S, Lease
from schedules.beat import BEAT_LOCK_TIMEOUT_S
from tests.conftest import RedisServer
from tests.unit.test_schedules import BEAT_START_TIMEOUT_S, start_beat, stop, wait_for

YEAR_MS = 365 * 86_400 * 1000


@pytest.fixture
def r(redis_srv: RedisServer) -> redis.Redis:
    client = redis.Redis.from_url(redis_srv.url, decode_responses=True)
    client.flushdb()
    return client


def pttl(r: redis.Redis, key: str) -> int:
    return cast(int, r.pttl(key))


def said(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "lease.hand_written"]


def test_an_exporter_lease_of_a_year_is_taken_and_said_once(r: redis.Redis) -> None:
    r.set(EXPORTER_LEASE, "evil", px=YEAR_MS)
    lease = Lease(r, EXPORTER_LEASE, 60)
    with capture_logs() as logs:
        assert lease.renew() and lease.held()
        assert lease.renew()  # ours now: nothing more to say
    assert lease.holder() == lease.token and 0 < pttl(r, EXPORTER_LEASE) <= 60_000
    (entry,) = said(logs)
    assert entry["key"] == EXPORTER_LEASE
    assert "s to live, more than drover's 305 s" in entry["reason"]


def test_a_lease_as_long_as_drover_ever_gives_it_is_a_holder(r: redis.Redis) -> None:
    longest_ms = int(LONGEST_HOLD_S[EXPORTER_LEASE] * 1000)  # exporter_lease_ttl at its bound
    r.set(EXPORTER_LEASE, "another-exporter", px=longest_ms)
    lease = Lease(r, EXPORTER_LEASE, 60)
    with capture_logs() as logs:
        assert not lease.renew() and not lease.held()
    assert lease.holder() == "another-exporter" and said(logs) == []


def test_a_safety_pass_claim_of_a_year_is_free(r: redis.Redis) -> None:
    r.set(SAFETY_PASS, "evil", px=YEAR_MS)
    lanes = Lanes(r)
    assert lanes.claim_safety_pass("worker-a", 30)
    assert r.get(SAFETY_PASS) == "worker-a" and 0 < pttl(r, SAFETY_PASS) <= 30_000
    assert not lanes.claim_safety_pass("worker-b", 30)  # a real claim holds


def test_a_safety_pass_claim_at_its_longest_interval_holds(r: redis.Redis) -> None:
    r.set(SAFETY_PASS, "worker-a", px=int(LONGEST_HOLD_S[SAFETY_PASS] * 1000))
    assert not Lanes(r).claim_safety_pass("worker-b", 30)
    assert r.get(SAFETY_PASS) == "worker-a"


def test_the_beat_lock_bound_covers_the_lock_redbeat_keeps() -> None:
    assert BEAT_LOCK_TIMEOUT_S <= SCHEDULE_LOCK_TTL_S == LONGEST_HOLD_S[SCHEDULE_LOCK]
    assert HAND_WRITTEN_MARGIN_S > 0


def test_a_beat_lock_of_a_year_does_not_keep_a_beat_out(
    config: Path, r: redis.Redis, tmp_path: Path
) -> None:
    r.set(SCHEDULE_LOCK, "evil", px=YEAR_MS)
    log = tmp_path / "beat.log"
    beat = start_beat(config, log)
    try:
        try:  # a beat starts in seconds; the suite's other processes can slow it down
            wait_for(lambda: "Acquired lock" in log.read_text(), 3 * BEAT_START_TIMEOUT_S, "it")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the beat said:\n{log.read_text()}") from None
        assert r.get(SCHEDULE_LOCK) != "evil"
        assert 0 < pttl(r, SCHEDULE_LOCK) <= SCHEDULE_LOCK_TTL_S * 1000
    finally:
        stop(beat)
    assert beat.returncode == 0, log.read_text()
