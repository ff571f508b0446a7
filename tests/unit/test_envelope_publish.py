"""Every drover message is stamped with its envelope as it is published (a real Redis broker):
the worker needs no trust in the headers, and no sender has to remember to do it."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from config.celery import host_queue, make_app
from config.settings import load_settings
from jobs.phases import Phase, task_name
from jobs.spec import MigrationSpec
from jobs.workflow import migration_chain
from tests.conftest import RedisServer

JOB_ID = "0123456789ab"


def queued_bodies(r: redis.Redis, queue: str) -> list[tuple[dict[str, Any], list[Any]]]:
    """(headers, body) of each message waiting in `queue`, as the worker will decode it."""
    out = []
    for raw in r.lrange(queue, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        out.append((message["headers"], body))
    return out


def test_a_chain_start_carries_an_envelope_for_its_task_host_and_job(
    config: Path, redis_srv: RedisServer
) -> None:
    settings = load_settings(config)
    app = make_app(settings)
    spec = {"domain": "web01", "src": "kvm1", "dst": "kvm2"}
    before = time.time()
    migration_chain(app, JOB_ID, MigrationSpec(**spec)).apply_async()
    r = redis.Redis.from_url(redis_srv.url)
    [(headers, (args, kwargs, embed))] = queued_bodies(r, host_queue("kvm1"))
    env = kwargs["envelope"]
    assert headers["task"] == env["task"] == task_name(Phase.SOURCE_PREFLIGHT)
    assert env["host"] == "kvm1" and env["job"] == JOB_ID == args[0]
    ttl = settings.tunables.message_ttl
    assert before + ttl <= env["exp"] <= time.time() + ttl
    assert len(env["nonce"]) == 32
    # The rest of the chain travels in the signed body; its steps get their own envelopes
    # when the worker that finished the step before publishes them.
    steps = embed["chain"]
    assert [s["task"] for s in reversed(steps)] == [
        task_name(p)
        for p in (Phase.DESTINATION_PREPARE, Phase.PERFORM, Phase.FINISH, Phase.CONFIRM)
    ]
    assert all("envelope" not in s["kwargs"] for s in steps)


def test_two_messages_never_share_a_nonce(config: Path, redis_srv: RedisServer) -> None:
    app = make_app(load_settings(config))
    for _ in range(2):
        app.send_task(task_name(Phase.FINISH), args=(JOB_ID,), queue=host_queue("kvm2"))
    bodies = queued_bodies(redis.Redis.from_url(redis_srv.url), host_queue("kvm2"))
    nonces = {b[1]["envelope"]["nonce"] for _, b in bodies}
    assert len(bodies) == 2 and len(nonces) == 2


def test_a_control_request_expires_when_its_producer_stops_waiting(
    config: Path, redis_srv: RedisServer
) -> None:
    """Probe: told "no answer", the operator's post-copy was still made by the source's
    worker once restarted (the message waited in its queue). A control request's signed
    envelope now expires with the producer's wait (the `expires` it gave Celery)."""
    from jobs.phases import POSTCOPY_TASK
    from producer.control import ControlRequests

    settings = load_settings(config)
    app = make_app(settings)
    sent: list[Any] = []
    requests = ControlRequests(settings, _Store(), app, lambda s: sent.append(s.apply_async()), "t")
    before = time.time()
    with pytest.raises(_Sent):  # no worker here: stop at the wait for its answer
        requests._ask(_Job(), POSTCOPY_TASK, "post-copy", lambda _: None)
    [(headers, (_, kwargs, _))] = queued_bodies(
        redis.Redis.from_url(redis_srv.url), host_queue("kvm1")
    )
    valid = settings.tunables.control_reply_timeout
    assert valid < settings.tunables.message_ttl
    assert before + valid - 1 <= kwargs["envelope"]["exp"] <= time.time() + valid
    assert headers["expires"] is not None


class _Job:
    """The part of a job record `_ask` reads."""

    id = JOB_ID
    spec = MigrationSpec(domain="web01", src="kvm1", dst="kvm2")


class _Sent(Exception):
    """The request was sent; the test does not wait for an answer."""


class _Store:
    """The part of the job store `_ask` uses before it waits."""

    def newest_event_id(self, job_id: str) -> str:
        return "0-0"

    def read_batch(self, job_id: str, after: str, *, block_ms: int) -> Any:
        raise _Sent
