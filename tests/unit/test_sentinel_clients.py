"""Each client, given a `sentinel://` redis_url, reaches the master through a real sentinel.

One redis-sentinel (Debian's package) watches the suite's own redis-server; the sentinel takes
the same password. The job store, kombu (Celery's broker) and redbeat each get their
translation of the one URL and must read and write the master through it; the store's WAIT
finds no replica and says so within its timeout instead of hanging.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu import Connection

from config.celery import celery_config
from config.redis_acl import write_private
from config.settings import load_settings
from jobs.connection import client_for
from jobs.errors import BrokerUnavailable, broker_errors
from jobs.replication import ReplicaWait
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import enqueue
from lab.proc import kill, spawn, wait_until
from schedules.beat import redbeat_config
from tests.conftest import RedisServer, free_port

MASTER = "unit"
SENTINEL_START_S = 10.0


@pytest.fixture(scope="module")
def sentinel_url(tmp_path_factory: pytest.TempPathFactory, redis_srv: RedisServer) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("sentinel")
    port = free_port()
    conf = directory / "sentinel.conf"
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        f"dir {directory}",
        f"requirepass {redis_srv.password}",
        f"sentinel monitor {MASTER} 127.0.0.1 {redis_srv.port} 1",
        f"sentinel auth-pass {MASTER} {redis_srv.password}",
        "",
    ]
    write_private(conf, "\n".join(lines))
    pid = spawn(["redis-sentinel", str(conf)], directory / "sentinel.log")
    ask = redis.Redis(port=port, password=redis_srv.password, socket_timeout=1)

    def knows_master() -> bool:
        try:
            return bool(ask.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER))  # type: ignore[no-untyped-call]
        except redis.RedisError:
            return False

    try:
        wait_until(knows_master, SENTINEL_START_S, "redis-sentinel to watch the master")
        yield f"sentinel://:{redis_srv.password}@127.0.0.1:{port}/0?master_name={MASTER}"
    finally:
        ask.close()
        kill([pid])


def test_the_store_reads_and_writes_the_master_and_waits_in_bounds(sentinel_url: str) -> None:
    store = JobStore.from_url(sentinel_url, retry_for=5.0)
    store.r.set("drover:unit:sentinel", "yes")
    assert store.r.get("drover:unit:sentinel") == "yes"
    assert store.r.info("replication")["role"] == "master"
    started = time.monotonic()
    assert store.replicated() is False  # no replica: WAIT gives up, the caller goes on
    assert time.monotonic() - started < 5 * store.replica_wait.timeout_ms / 1000
    store.r.delete("drover:unit:sentinel")


def test_kombu_and_redbeat_reach_the_master(sentinel_url: str, tmp_path: Path) -> None:
    config = tmp_path / "drover.toml"
    config.write_text(f'redis_url = "{sentinel_url}"\n[security]\ninsecure = true\n')
    settings = load_settings(config)
    conf = celery_config(settings)
    with Connection(conf["broker_url"], transport_options=conf["broker_transport_options"]) as c:
        queue = c.SimpleQueue("drover.unit.sentinel")
        queue.put({"hello": "sentinel"})
        message = queue.get(timeout=5)
        assert message.payload == {"hello": "sentinel"}
        message.ack()
        queue.close()
    app = Celery("unit", set_as_current=False)
    app.conf.update(redbeat_config(settings))
    from redbeat.schedulers import get_redis

    client = get_redis(app)
    assert client.ping()
    assert client.info("replication")["role"] == "master"


def waits(store: JobStore) -> int:
    """How many WAIT commands the server has run so far."""
    stats = store.r.info("commandstats").get("cmdstat_wait", {})
    return int(stats.get("calls", 0))


def test_creation_claims_and_transitions_wait_for_a_replica(sentinel_url: str) -> None:
    """The write-loss guard runs where it must (jobs/replication.py): after a job is created
    (and in line), after a phase is claimed, after a transition; not after a claim refused."""
    store = JobStore.from_url(sentinel_url, retry_for=5.0)
    store.replica_wait = ReplicaWait(1, 10)  # no replica here: each WAIT gives up in 10 ms
    domain = f"sentinel-unit-{time.monotonic_ns()}"
    before = waits(store)
    job_id = enqueue(store, MigrationSpec(domain=domain, src="kvm1", dst="kvm2"), origin="t")
    assert waits(store) == before + 1
    assert store.claim_phase(job_id, "preflight", "kvm1")
    assert waits(store) == before + 2
    assert not store.claim_phase(job_id, "preflight", "kvm1")
    assert waits(store) == before + 2
    moved, _ = store.transition(job_id, JobState.FAILED, host="kvm1", reason="unit test")
    assert moved and waits(store) == before + 3


def test_a_password_the_sentinels_refuse_is_one_line_without_it(sentinel_url: str) -> None:
    wrong = "wrong-password-0123456789"
    url = sentinel_url.replace(sentinel_url.split("@")[0], f"sentinel://:{wrong}")
    with pytest.raises(BrokerUnavailable) as info, broker_errors(url):
        client_for(url, probe_timeout=1.0).ping()
    message = str(info.value)
    assert f"No master found for '{MASTER}'" in message and "invalid" in message, message
    assert wrong not in message and "\n" not in message


INSECURE = "[security]\ninsecure = true\n"


def test_the_config_sets_the_replica_wait_of_every_store_of_a_worker_or_producer(
    sentinel_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "drover.toml"
    tunables = "[tunables]\nredis_wait_replicas = 2\nredis_wait_ms = 750\n"
    config.write_text(f'redis_url = "{sentinel_url}"\n{INSECURE}{tunables}')
    store = JobStore.from_settings(load_settings(config), retry_for=1.0)
    assert store.replica_wait == ReplicaWait(2, 750)
    assert store.without_retry.replica_wait == ReplicaWait(2, 750)
    plain = tmp_path / "plain.toml"
    plain.write_text(f'redis_url = "redis://127.0.0.1:1/0"\n{INSECURE}')
    assert JobStore.from_settings(load_settings(plain), retry_for=0).replica_wait.replicas == 0
