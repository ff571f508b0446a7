"""A worker's restore of unacknowledged messages against what anyone with the Redis password
can write into kombu's keys (a real Redis, drover's consumer transport).

kombu's restore ran at every worker start: one junk `unacked` entry raised out of it and ended
every worker that (re)started, and held up the real lost messages behind it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from structlog.testing import capture_logs

from config.broker_transport import Transport
from tests.conftest import RedisServer

QUEUE = "drover.host.kvm1"
JUNK = [
    b"not json at all",
    b"\xff\xfe",
    b"[]",
    b"null",
    b'{"a": 1}',
    b'["x", "y", "z"]',
    b'[{"body": 1}, 5, "rk"]',
    b'[{"body": "", "headers": "str", "properties": {}}, "ex", "rk"]',
    b"[" * 100_000,
]


@pytest.fixture
def r(redis_srv: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_srv.url)
    client.flushdb()
    yield client
    client.flushdb()


def connection(redis_srv: RedisServer) -> Connection:
    return Connection(redis_srv.url, transport=Transport)


def lost_message(redis_srv: RedisServer) -> str:
    """Publish one message to the host's queue and take it as a consumer that then dies
    without acknowledging it: kombu leaves it in `unacked`. Returns its delivery tag."""
    queue = Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE)
    with connection(redis_srv) as conn:
        conn.Producer().publish(
            {"job": "real"},
            exchange=queue.exchange,
            routing_key=QUEUE,
            declare=[queue],
            serializer="json",
        )
        channel = conn.default_channel
        message = channel.basic_get(QUEUE, no_ack=False)
        assert message is not None
        channel.do_restore = False  # it dies: nothing put back at close
        return str(message.delivery_tag)


def restore(redis_srv: RedisServer) -> Any:
    """What a (re)starting worker runs before it consumes (kombu's on_poll_init)."""
    with connection(redis_srv) as conn:
        return conn.default_channel.qos.restore_visible(num=10, interval=1)


def queued(r: redis.Redis) -> list[Any]:
    return [json.loads(raw)["body"] for raw in r.lrange(QUEUE, 0, -1)]


def rejections(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "message.rejected"]


@pytest.mark.parametrize("junk", JUNK, ids=lambda j: repr(j[:24]))
def test_junk_before_a_lost_message_is_removed_and_the_message_restored(
    r: redis.Redis, redis_srv: RedisServer, junk: bytes
) -> None:
    tag = lost_message(redis_srv)
    r.zadd("unacked_index", {tag: 0})
    r.hset("unacked", "probe-junk", junk)
    r.zadd("unacked_index", {"probe-junk": 1})  # restored first (highest score first)
    assert r.llen(QUEUE) == 0
    with capture_logs() as logs:
        restore(redis_srv)  # no exception: the worker starts
    assert len(queued(r)) == 1  # the lost message is back on its queue
    assert r.hkeys("unacked") == [] and r.zrange("unacked_index", 0, -1) == []
    [said] = rejections(logs)
    assert said["tag"] == "'probe-junk'" and "removed" in said["reason"]
    assert "\n" not in said["reason"] and len(said["reason"]) <= 200
    with capture_logs() as logs:
        restore(redis_srv)  # said once: the entry is gone
    assert rejections(logs) == [] and len(queued(r)) == 1


def test_a_junk_binding_member_is_removed_and_routing_goes_on(
    r: redis.Redis, redis_srv: RedisServer
) -> None:
    tag = lost_message(redis_srv)
    r.zadd("unacked_index", {tag: 0})
    r.sadd(f"_kombu.binding.{QUEUE}", "junk", b"\xff")
    with capture_logs() as logs:
        restore(redis_srv)
    assert len(queued(r)) == 1
    assert r.smembers(f"_kombu.binding.{QUEUE}") == {f"{QUEUE}\x06\x16\x06\x16{QUEUE}".encode()}
    assert len(rejections(logs)) == 2


# (what is planted, how many lost messages come back): a key of another type in place of
# `unacked` or `unacked_index` has overwritten kombu's, so there is nothing left to restore, but
# the worker starts and its later acknowledgements work again.
FOREIGN = {
    "mutex-no-expiry": (lambda r: r.set("unacked_mutex", "held"), 1),
    "mutex-long": (lambda r: r.set("unacked_mutex", "held", ex=10**6), 1),
    "unacked-string": (lambda r: r.set("unacked", "string"), 0),
    "index-string": (lambda r: r.set("unacked_index", "string"), 0),
}


@pytest.mark.parametrize("name", FOREIGN)
def test_a_foreign_key_in_kombus_place_is_removed_and_said_once(
    r: redis.Redis, redis_srv: RedisServer, name: str
) -> None:
    plant, restored = FOREIGN[name]
    tag = lost_message(redis_srv)
    r.zadd("unacked_index", {tag: 0})
    plant(r)
    with capture_logs() as logs:
        restore(redis_srv)
    assert len(queued(r)) == restored
    assert r.type("unacked") in (b"hash", b"none") and r.type("unacked_index") in (b"zset", b"none")
    assert not r.exists("unacked_mutex")
    assert len(rejections(logs)) == 1
    tag = lost_message(redis_srv)  # kombu's ack emulation works again
    assert r.hexists("unacked", tag)
