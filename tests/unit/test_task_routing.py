"""Routing and signed task messages, with pytest-celery's app and worker fixtures.

The fixtures (`celery_config`, `celery_parameters`, `celery_session_app`,
`celery_session_worker`, from the pytest-celery plugin) are given drover's own Celery
settings (config/celery.py, signing on with a fleet key), on the real redis-server the tests
start: no in-memory broker. A producer's chain must land each phase on the queue of the host
that owns it; a worker must run a message signed with a trusted key and refuse one that is
unsigned or whose signature no longer matches.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.serialization import loads

from config.celery import celery_config as drover_celery_config
from config.celery import host_queue
from config.security import enable_signing
from config.settings import Settings, load_settings
from jobs.phases import PHASE_ORDER, PHASE_SIDE, Side, task_name
from jobs.spec import MigrationSpec
from jobs.workflow import migration_chain
from lab.signing import make_certificate
from tests.conftest import RedisServer
from tests.support.lab_fixtures import wait_for
from tests.support.registry import REGISTRY, signing_section

SPEC = MigrationSpec(domain="web01", src="kvm1", dst="kvm2")
PROBE_TASK = "drover.test_signed_probe"
PROBE_QUEUE = f"drover.test.signed.{uuid.uuid4().hex[:8]}"
# A queue nothing consumes: a signed message is parked there to be altered.
PARKED_QUEUE = f"{PROBE_QUEUE}.parked"
RUN_S = 20.0
# A refused message is dropped at once; this long without it running is proof enough.
REFUSED_WITHIN_S = 2.0
AUTH = "application/data"  # the content type of Celery's `auth` serializer


@pytest.fixture(scope="session")
def fleet_settings(tmp_path_factory: pytest.TempPathFactory, redis_srv: RedisServer) -> Settings:
    """A fleet with signing on: its key, and a store trusting only its certificate."""
    keys = tmp_path_factory.mktemp("routing-keys")
    (keys / "trusted").mkdir()
    make_certificate(keys / "key.pem", keys / "cert.pem", "/CN=producer")
    shutil.copy(keys / "cert.pem", keys / "trusted" / "producer.pem")
    config = keys / "drover.toml"
    config.write_text(REGISTRY.format(url=redis_srv.url) + signing_section(keys))
    return load_settings(config)


@pytest.fixture(scope="session")
def celery_config(fleet_settings: Settings) -> dict[str, Any]:
    """pytest-celery's app and worker get drover's settings, bar the worker's task modules
    (they need a hypervisor) and its queue (a private one)."""
    return {
        **drover_celery_config(fleet_settings),
        "include": [],
        "task_default_queue": PROBE_QUEUE,
        "worker_send_task_events": False,
    }


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    # drover's workers obey no remote control, so the worker cannot be pinged into readiness.
    return {"perform_ping_check": False, "queues": [PROBE_QUEUE]}


class Ran:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.job_ids: list[str] = []

    def __contains__(self, job_id: str) -> bool:
        with self.lock:
            return job_id in self.job_ids


@pytest.fixture(scope="session")
def ran(celery_session_app: Celery, fleet_settings: Settings) -> Ran:
    """The session app, signing as the fleet does, with a probe task that records its runs."""
    enable_signing(celery_session_app, fleet_settings)
    record = Ran()

    @celery_session_app.task(name=PROBE_TASK)
    def probe(job_id: str, **_stamped: Any) -> None:  # drover's publisher adds an envelope
        with record.lock:
            record.job_ids.append(job_id)

    return record


@pytest.fixture(scope="session")
def worker(ran: Ran, celery_session_worker: Any) -> Iterator[Ran]:
    """pytest-celery's session worker, started once the probe task is registered."""
    yield ran


@pytest.fixture
def broker(redis_srv: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_srv.url)


def _messages(broker: redis.Redis, queue: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in broker.lrange(queue, 0, -1)]


def test_a_chain_lands_on_the_first_phase_hosts_queue_and_routes_the_rest(
    celery_session_app: Celery, ran: Ran, broker: redis.Redis
) -> None:
    for host in (SPEC.src, SPEC.dst):
        broker.delete(host_queue(host))
    migration_chain(celery_session_app, "0123456789ab", SPEC).apply_async()

    assert broker.llen(host_queue(SPEC.dst)) == 0  # nothing of the destination's yet
    (message,) = _messages(broker, host_queue(SPEC.src))
    first = PHASE_ORDER[0]
    assert message["headers"]["task"] == task_name(first)
    assert message["properties"]["delivery_info"]["routing_key"] == host_queue(SPEC.src)
    assert message["content-type"] == AUTH  # signed, as every drover message
    assert message["properties"]["body_encoding"] == "base64"
    args, _kwargs, embed = loads(
        base64.b64decode(message["body"]), AUTH, message["content-encoding"], accept=["auth"]
    )
    assert args == ["0123456789ab"]
    # The rest of the chain rides in the message, each phase bound for its owner's queue
    # (Celery keeps it last phase first).
    rest = [(s["task"], s["options"]["queue"]) for s in reversed(embed["chain"])]
    assert rest == [
        (task_name(p), host_queue(SPEC.src if PHASE_SIDE[p] is Side.SOURCE else SPEC.dst))
        for p in PHASE_ORDER[1:]
    ]
    broker.delete(host_queue(SPEC.src))


def test_a_message_signed_with_the_fleet_key_runs(celery_session_app: Celery, worker: Ran) -> None:
    job_id = uuid.uuid4().hex[:12]
    celery_session_app.send_task(PROBE_TASK, args=(job_id,), queue=PROBE_QUEUE)
    wait_for(lambda: job_id in worker, RUN_S, "the signed message to run")


def _refused(job_id: str, worker: Ran, celery_session_app: Celery) -> bool:
    """True once the worker took a later, signed message while `job_id` never ran."""
    marker = uuid.uuid4().hex[:12]
    celery_session_app.send_task(PROBE_TASK, args=(marker,), queue=PROBE_QUEUE)
    wait_for(lambda: marker in worker, RUN_S, "the signed marker after the refused message")
    return job_id not in worker


def test_an_unsigned_message_is_refused(
    celery_session_app: Celery, worker: Ran, redis_srv: RedisServer
) -> None:
    job_id = uuid.uuid4().hex[:12]
    with Connection(redis_srv.url) as conn:
        producer = conn.Producer(serializer="json")
        producer.publish(
            [[job_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
            exchange=Exchange(PROBE_QUEUE, "direct"),
            routing_key=PROBE_QUEUE,
            declare=[Queue(PROBE_QUEUE, Exchange(PROBE_QUEUE, "direct"), PROBE_QUEUE)],
            headers={"task": PROBE_TASK, "id": str(uuid.uuid4()), "lang": "py"},
        )
    assert _refused(job_id, worker, celery_session_app)


def test_a_signed_message_altered_in_redis_is_refused(
    celery_session_app: Celery, worker: Ran, broker: redis.Redis
) -> None:
    job_id = uuid.uuid4().hex[:12]
    celery_session_app.send_task(PROBE_TASK, args=(job_id,), queue=PARKED_QUEUE)
    raw = broker.rpop(PARKED_QUEUE)
    assert raw is not None
    message = json.loads(raw)
    body = message["body"]
    # One character of the signed payload changed, as an attacker with the password could.
    i = len(body) // 2
    message["body"] = body[:i] + ("A" if body[i] != "A" else "B") + body[i + 1 :]
    message["properties"]["delivery_info"]["routing_key"] = PROBE_QUEUE
    broker.lpush(PROBE_QUEUE, json.dumps(message))
    assert _refused(job_id, worker, celery_session_app)
