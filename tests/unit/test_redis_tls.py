"""`rediss://` pointed at a Redis without TLS: a bounded, one-line failure, not a hang.

redis-py runs the TLS handshake under the socket's reply timeout, which drover leaves unset;
Redis reads the ClientHello as the start of a command line and waits for its end, so every
`drover` command used to hang for ever. The test's own Redis (no TLS) plays that server.
"""

from __future__ import annotations

import time

import pytest
import redis

from jobs import connection
from jobs.store import JobStore
from tests.conftest import RedisServer

BOUND_S = 0.5
# The handshake bound plus a connect and a retry's back-off, on a busy machine.
SLACK_S = 5.0


@pytest.mark.parametrize("retry_for", [0.0, 1.0])
def test_a_tls_url_to_a_plain_redis_fails_in_one_line_within_the_bound(
    redis_srv: RedisServer, monkeypatch: pytest.MonkeyPatch, retry_for: float
) -> None:
    monkeypatch.setattr(connection, "TLS_HANDSHAKE_TIMEOUT_S", BOUND_S)
    url = redis_srv.url.replace("redis://", "rediss://", 1)
    store = JobStore.from_url(url, retry_for=retry_for)
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError) as caught:
        store.get("no-such-job")
    took = time.monotonic() - started
    assert took < BOUND_S + retry_for + SLACK_S, took
    message = str(caught.value)
    assert f"127.0.0.1:{redis_srv.port} did not answer a TLS handshake within 0.5s" in message
    assert "rediss:// needs one with TLS" in message and "\n" not in message


def test_a_connect_timeout_set_by_the_caller_bounds_the_handshake(
    redis_srv: RedisServer,
) -> None:
    url = redis_srv.url.replace("redis://", "rediss://", 1)
    client = connection.client_for(url, probe_timeout=0.3)
    with pytest.raises(redis.ConnectionError, match=r"TLS handshake within 0\.3s"):
        client.ping()
