"""The store's WAIT on a node that turned replica under it (a failover) must not fail a phase.

Two real redis-servers: the suite's own and a second one made its replica. A WAIT sent to the
replica is refused by Redis ("WAIT cannot be used with replica instances"); the store counts
it as not acknowledged, as a timed-out WAIT, and the client goes on working.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobs.replication import ReplicaWait
from lab.proc import wait_until
from tests.conftest import RedisServer

FOLLOW_S = 10.0


@pytest.fixture()
def replica(tmp_path: Path, redis_srv: RedisServer) -> Iterator[redis.Redis]:
    srv = RedisServer(tmp_path)
    srv.start()
    client = redis.Redis.from_url(srv.url, decode_responses=True)
    try:
        client.config_set("masterauth", redis_srv.password)
        client.replicaof("127.0.0.1", redis_srv.port)
        wait_until(
            lambda: client.info("replication")["master_link_status"] == "up",
            FOLLOW_S,
            "the second server to follow the first",
        )
        yield client
    finally:
        client.close()
        srv.stop()


def test_a_wait_that_reaches_a_replica_counts_as_not_acknowledged(replica: redis.Redis) -> None:
    with pytest.raises(redis.ResponseError, match="replica"):
        replica.wait(1, 10)  # what Redis says, so the guard below is not vacuous
    assert ReplicaWait(1, 10)(replica) is False
    assert replica.ping()  # the client still works after its idle connections were dropped


def test_any_other_refusal_of_wait_is_not_swallowed(redis_srv: RedisServer) -> None:
    client = redis.Redis.from_url(redis_srv.url, decode_responses=True)
    try:
        with pytest.raises(redis.ResponseError):
            ReplicaWait(1, -5)(client)  # a negative timeout: a caller's bug, not a failover
    finally:
        client.close()
