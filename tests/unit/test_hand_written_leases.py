"""A lease, claim or lock written by hand with no time to live (anyone with the Redis
password): every holder drover runs sets one with a time to live, so such a value holds
nothing, and the exporter, the admission safety pass and `drover beat` take over from it."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import redis

from jobs.keys import EXPORTER_LEASE, SAFETY_PASS, SCHEDULE_LOCK
from jobs.lanes import Lanes
from jobs.lease import Lease
from tests.conftest import RedisServer
from tests.unit.test_schedules import BEAT_START_TIMEOUT_S, start_beat, stop, wait_for


@pytest.fixture
def r(redis_srv: RedisServer) -> redis.Redis:
    client = redis.Redis.from_url(redis_srv.url, decode_responses=True)
    client.flushdb()
    return client


def pttl(r: redis.Redis, key: str) -> int:
    return cast(int, r.pttl(key))


def hand_written(r: redis.Redis, key: str, kind: str) -> None:
    if kind == "string":
        r.set(key, "evil")
    else:
        r.hset(key, "x", "y")


@pytest.mark.parametrize("kind", ["string", "hash"])
def test_a_lease_with_no_expiry_is_free(r: redis.Redis, kind: str) -> None:
    hand_written(r, EXPORTER_LEASE, kind)
    lease = Lease(r, EXPORTER_LEASE, 60)
    assert lease.renew() and lease.held()
    assert lease.holder() == lease.token
    assert 0 < pttl(r, EXPORTER_LEASE) <= 60_000
    assert lease.renew()  # and then it is ours, as any lease
    lease.release()
    assert lease.holder() is None


def test_a_live_holders_lease_is_never_taken(r: redis.Redis) -> None:
    r.set(EXPORTER_LEASE, "another-exporter", px=60_000)
    lease = Lease(r, EXPORTER_LEASE, 60)
    assert not lease.renew() and not lease.held()
    assert lease.holder() == "another-exporter"


def test_a_hand_written_lease_of_another_type_is_not_an_error_to_release(
    r: redis.Redis,
) -> None:
    lease = Lease(r, EXPORTER_LEASE, 60)
    r.hset(EXPORTER_LEASE, "x", "y")
    r.pexpire(EXPORTER_LEASE, 60_000)  # with a time to live: left to lapse
    lease.release()
    assert r.type(EXPORTER_LEASE) == "hash"


@pytest.mark.parametrize("kind", ["string", "hash"])
def test_a_safety_pass_claim_with_no_expiry_is_free(r: redis.Redis, kind: str) -> None:
    hand_written(r, SAFETY_PASS, kind)
    lanes = Lanes(r)
    assert lanes.claim_safety_pass("worker-a", 30)
    assert r.get(SAFETY_PASS) == "worker-a" and 0 < pttl(r, SAFETY_PASS) <= 30_000
    assert not lanes.claim_safety_pass("worker-b", 30)  # a real claim holds


def test_a_beat_lock_with_no_expiry_does_not_keep_a_beat_out(
    config: Path, r: redis.Redis, tmp_path: Path
) -> None:
    r.set(SCHEDULE_LOCK, "evil")
    log = tmp_path / "beat.log"
    beat = start_beat(config, log)
    try:
        try:  # a beat starts in seconds; the suite's other processes can slow it down
            wait_for(lambda: "Acquired lock" in log.read_text(), 3 * BEAT_START_TIMEOUT_S, "it")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the beat said:\n{log.read_text()}") from None
        assert r.get(SCHEDULE_LOCK) != "evil" and pttl(r, SCHEDULE_LOCK) > 0
    finally:
        stop(beat)
    assert beat.returncode == 0, log.read_text()
